// The web app in Chromium against the real server (server.mjs): one server
// and one browser for the file, and a fresh browser context per person (its
// own storage, so its own device). Each test has its own people or its own
// group, so it does not depend on the others having run.
//
// Every wait is for a condition and ends after WAIT_MS, saying what it
// awaited. Screenshots go to $MESSENGER_SCREENSHOTS when set (to refresh
// docs/screenshots), else to a temporary directory.

import assert from "node:assert/strict";
import { createServer } from "node:http";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, afterEach, before, test } from "node:test";
import { deflateSync } from "node:zlib";
import { chromium } from "playwright-core";
import { start } from "./server.mjs";

const WAIT_MS = 10_000;
const TEST_TIMEOUT_MS = 60_000;
const VIEWPORT = { width: 1280, height: 800 };
const NARROW = { width: 420, height: 800 };
const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

let server;
let browser;
let screenshots;
/** Uncaught exceptions in any page of the running test. */
const pageErrors = [];

before(async () => {
  server = await start();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // CI runs as root, where Chromium's sandbox cannot start.
    args: ["--no-sandbox"],
  });
  screenshots = process.env.MESSENGER_SCREENSHOTS
    ? resolve(process.env.MESSENGER_SCREENSHOTS)
    : await mkdtemp(join(tmpdir(), "messenger-screenshots-"));
});

after(async () => {
  await browser?.close();
  await server?.stop();
  if (screenshots && !process.env.MESSENGER_SCREENSHOTS) await rm(screenshots, { recursive: true, force: true });
});

afterEach(() => {
  assert.deepEqual(pageErrors.splice(0), [], "the app threw");
});

test("two people chat live both ways: unread in the list, read, a reply and a reaction", { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const alice = await person(t, "alice");
  const bob = await person(t, "bob");
  const conversationId = await openDirect(alice, "bob");
  // Gone if the page reloads: everything below must arrive live.
  await alice.evaluate(() => (window.notReloaded = true));

  const question = "Hi Bob! Lunch at noon?";
  await send(alice, question);
  const item = conversationItem(bob, conversationId);
  await waitFor(item.getByTestId("unread").filter({ hasText: /^1 unread$/ }), "bob's list to show the chat with alice, 1 unread");
  await item.click();
  const received = messageWithBody(bob, question);
  await waitFor(received, "bob to see alice's message in the chat he opened");
  await waitFor(item.getByTestId("unread"), "bob's unread count to go once he has read the chat", "detached");

  await received.hover();
  await received.getByTestId("reply").click();
  const answer = "Sure, see you there";
  await send(bob, answer);
  await waitFor(
    messageWithBody(alice, answer).getByTestId("reply-quote").filter({ hasText: `alice: ${question}` }),
    "alice to see bob's reply, quoting her message",
  );

  await received.hover();
  await received.getByTestId("react").click();
  await received.locator('[data-testid=react-choice][data-emoji="👍"]').click();
  await waitFor(messageWithBody(alice, question).locator('[data-testid=reaction][data-emoji="👍"]').filter({ hasText: "1" }), "alice to see bob's 👍 on her message");
  await waitFor(tick(alice, question, "read"), "alice's tick to say read");

  const more = "Great, I'll book a table for two.";
  await send(alice, more);
  await waitFor(messageWithBody(bob, more), "bob to see alice's second message");
  await waitFor(tick(alice, more, "read"), "alice's second tick to say read (bob has the chat open)");
  assert.equal(await alice.evaluate(() => window.notReloaded), true, "alice's page reloaded");

  await screenshot(alice, "conversation.png");
});

test("the sender's tick turns to read only once the reader opens the conversation", { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const alice = await person(t, "alice");
  const dave = await person(t, "dave");
  const conversationId = await openDirect(alice, "dave");
  const text = "Did you get the report?";
  const tickStates = await recordTicks(alice, text);
  await send(alice, text);

  // Dave's device has it (his app acked it) but he has not opened it.
  const item = conversationItem(dave, conversationId);
  await waitFor(item, "dave's list to show the chat with alice");
  await waitFor(tick(alice, text, "delivered").or(tick(alice, text, "read")), "alice's tick to say delivered");
  const beforeOpening = await tickStates();
  assert.ok(!beforeOpening.includes("read"), `read before dave opened the chat: ${beforeOpening}`);
  assert.equal(await item.getByTestId("unread").textContent(), "1 unread", "dave's unread count before he opened the chat");

  await item.click();
  await waitFor(messageWithBody(dave, text), "dave to see the message");
  await waitFor(tick(alice, text, "read"), "alice's tick to say read once dave opened the chat");
  assert.equal((await tickStates()).at(-1), "read");
});

test("a photo sent in one browser shows as a thumbnail in the other and opens full size", { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const alice = await person(t, "alice");
  const erin = await person(t, "erin");
  const conversationId = await openDirect(alice, "erin");
  await send(alice, "Here is the floor plan");
  await conversationItem(erin, conversationId).click();
  await waitFor(messageWithBody(erin, "Here is the floor plan"), "erin to see alice's message");

  await alice.getByTestId("file-input").setInputFiles({ name: "plan.png", mimeType: "image/png", buffer: png(64, 48) });
  await waitFor(alice.getByTestId("upload-progress"), "alice's upload progress to show");
  await waitFor(alice.getByTestId("message").and(alice.locator("[data-seq]")).filter({ has: alice.getByTestId("thumbnail") }), "alice's photo message to be sent");

  await waitFor(erin.getByTestId("thumbnail"), "erin to see the photo's thumbnail");
  const thumbnail = await loadedImage(erin, "[data-testid=thumbnail]", "erin's thumbnail to load");
  assert.equal(thumbnail.width * 48, thumbnail.height * 64, `a ${thumbnail.width}x${thumbnail.height} thumbnail of a 64x48 photo`);

  await erin.getByTestId("thumbnail").click();
  await waitFor(erin.getByTestId("viewer"), "the photo viewer to open");
  const full = await loadedImage(erin, "[data-testid=full-image]", "the full-size photo to load");
  assert.deepEqual(full, { width: 64, height: 48 }, "the full-size photo is the one sent");
});

test("offline and back: messages sent meanwhile show once each, in order", { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const alice = await person(t, "alice");
  const frank = await person(t, "frank");
  const conversationId = await openDirect(alice, "frank");
  await send(alice, "before the tunnel");
  await conversationItem(frank, conversationId).click();
  await waitFor(messageWithBody(frank, "before the tunnel"), "frank to see alice's first message");

  await frank.context().setOffline(true);
  await waitFor(connection(frank, "reconnecting"), "frank's connection to show reconnecting once offline");
  const whileAway = ["while away 1", "while away 2", "while away 3"];
  for (const text of whileAway) await send(alice, text);
  assert.equal(await frank.getByTestId("message").count(), 1, "frank got messages while offline");

  await frank.context().setOffline(false);
  await waitFor(connection(frank, "connected"), "frank's connection to come back");
  for (const text of whileAway) await waitFor(messageWithBody(frank, text), `frank to see "${text}"`);
  // Within a session a conversation's entries arrive in seq order
  // (docs/clients.md, "Resuming"): once this newer one is drawn, so is any
  // replayed entry that could show twice. No settling time needed.
  await send(alice, "out of the tunnel");
  await waitFor(messageWithBody(frank, "out of the tunnel"), "frank to see the message sent after he came back");

  const shown = await frank.getByTestId("message").evaluateAll((items) =>
    items.map((item) => ({ seq: Number(item.dataset.seq), body: item.querySelector("[data-testid=body]")?.textContent })),
  );
  assert.deepEqual(
    shown.map((message) => message.body),
    ["before the tunnel", ...whileAway, "out of the tunnel"],
  );
  const seqs = shown.map((message) => message.seq);
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "messages out of seq order");
  assert.equal(new Set(seqs).size, seqs.length, `a seq shown twice: ${seqs}`);
});

test("someone added to a group sees its history only from when they joined", { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const alice = await person(t, "alice");
  const bob = await person(t, "bob");
  const carol = await person(t, "carol");
  // Anything carol's page ever draws (list previews included) is checked, not just the end state.
  await carol.evaluate(() => {
    const check = () => (window.sawBeforeCarol ||= document.body.textContent.includes("before carol"));
    new MutationObserver(check).observe(document.body, { subtree: true, childList: true, characterData: true });
    check();
  });

  await alice.getByTestId("new-group-title").fill("Lunch crew");
  await alice.getByTestId("new-group-members").fill("bob");
  await alice.getByTestId("new-group-button").click();
  await waitFor(alice.getByTestId("conversation-title").filter({ hasText: "Lunch crew" }), "alice's new group to open");
  const groupId = await currentConversation(alice);
  await send(alice, "before carol");
  await conversationItem(bob, groupId).click();
  await waitFor(messageWithBody(bob, "before carol"), "bob, a member, to see the first message");

  await alice.getByTestId("add-member").fill("carol");
  await alice.getByTestId("add-member-button").click();
  await waitFor(alice.getByTestId("members").filter({ hasText: "carol" }), "carol in alice's member list");
  await send(alice, "after carol");

  const item = conversationItem(carol, groupId);
  await waitFor(item.filter({ hasText: "after carol" }), "carol's list to show the group with the message sent after she joined");
  await item.click();
  await waitFor(messageWithBody(carol, "after carol"), "carol to see the message sent after she joined");
  // Carol marks read only once History has answered; bob has the group open and reads at once.
  await waitFor(tick(alice, "after carol", "read"), "alice's tick to say read by bob and carol");
  await nextFrames(carol); // the app draws what History brought at the next frame
  assert.equal(await messageWithBody(carol, "before carol").count(), 0, "carol sees a message from before she joined");
  assert.equal(await carol.evaluate(() => window.sawBeforeCarol), false, "carol's page showed a message from before she joined");
  assert.equal(await messageWithBody(bob, "after carol").count(), 1);

  await alice.setViewportSize(NARROW);
  await alice.getByTestId("back").click();
  await waitFor(conversationItem(alice, groupId), "alice's conversation list on a narrow screen");
  await screenshot(alice, "conversation-list.png");
});

test("a stream from another origin is refused before the upgrade; from the app's own origin it opens", { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const address = new URL("v1/stream", server.url).href.replace(/^http/, "ws");
  const other = createServer((request, response) => {
    response.setHeader("content-type", "text/html; charset=utf-8");
    response.end(`<!doctype html><title>elsewhere</title><script>(${openStream})(${JSON.stringify(address)})</script>`);
  });
  await new Promise((listening) => other.listen(0, "127.0.0.1", listening));
  t.after(() => new Promise((closed) => other.close(closed)));
  const context = await browser.newContext();
  t.after(() => context.close());

  const page = await context.newPage();
  const handshakeErrors = [];
  page.on("websocket", (socket) => socket.on("socketerror", (error) => handshakeErrors.push(error)));
  await page.goto(`http://127.0.0.1:${other.address().port}/`);
  await until(page, () => window.result.closeCode !== null, "the other origin's socket to close");
  assert.deepEqual(await page.evaluate(() => window.result), { opened: false, closeCode: 1006 });
  assert.match(handshakeErrors.join("\n"), /Unexpected response code: 403/);

  await page.goto(server.url);
  await page.evaluate(openStream, address);
  await until(page, () => window.result.closeCode !== null, "the app origin's socket to open and close");
  assert.equal(await page.evaluate(() => window.result.opened), true, "the app's own origin could not open the stream");
});

test("it is used from the keyboard alone, and every control has an accessible name", { timeout: TEST_TIMEOUT_MS }, async (t) => {
  const context = await browser.newContext({ viewport: VIEWPORT });
  context.setDefaultTimeout(WAIT_MS);
  t.after(() => context.close());
  const page = await context.newPage();
  page.on("pageerror", (error) => pageErrors.push(`gina: ${error.message}`));
  await page.goto(server.url);
  assert.deepEqual(await unnamedControls(page), [], "sign-in controls without a name");
  // Sign in: the user field has focus or is the first stop, Enter submits.
  await page.getByTestId("signin-user").focus();
  await page.keyboard.type("gina");
  await page.keyboard.press("Enter");
  await waitFor(connection(page, "connected"), "gina's stream to connect after Enter");
  // Start a chat and send, by keyboard.
  await page.getByTestId("new-direct").focus();
  await page.keyboard.type("hank");
  await page.keyboard.press("Enter");
  await waitFor(page.getByTestId("conversation-title").filter({ hasText: exactly("hank") }), "the chat to open after Enter");
  await page.getByTestId("composer").focus();
  await page.keyboard.type("typed, not clicked");
  await page.keyboard.press("Enter");
  await waitFor(messageWithBody(page, "typed, not clicked").and(page.locator("[data-seq]")), "the message sent with Enter");
  // Tab reaches the composer from the conversation list without a mouse.
  await page.getByTestId("new-direct").focus();
  let reached = false;
  for (let stop = 0; stop < 40 && !reached; stop++) {
    await page.keyboard.press("Tab");
    reached = await page.evaluate(() => document.activeElement?.dataset.testid === "composer");
  }
  assert.ok(reached, "Tab never reached the composer");
  assert.deepEqual(await unnamedControls(page), [], "controls without a name");
});

/** Visible inputs, text areas, selects and buttons with no accessible name (label, aria-label, aria-labelledby, text or title). */
function unnamedControls(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll("input, textarea, select, button")]
      .filter((control) => control.type !== "hidden" && control.getClientRects().length > 0)
      .filter(
        (control) =>
          !(control.labels?.length || control.getAttribute("aria-label") || control.getAttribute("aria-labelledby") ||
            control.textContent.trim() || control.title),
      )
      .map((control) => control.outerHTML.slice(0, 120)),
  );
}

/** Runs in a page: opens the stream and records what happens to it in window.result. */
function openStream(address) {
  const result = (window.result = { opened: false, closeCode: null });
  const socket = new WebSocket(address, "messenger.v1");
  socket.onopen = () => {
    result.opened = true;
    socket.close(1000);
  };
  socket.onclose = (event) => (result.closeCode = event.code);
}

// People and pages.

/** A person signed in in a context of their own, closed when the test ends. */
async function person(t, user) {
  const context = await browser.newContext({ viewport: VIEWPORT });
  context.setDefaultTimeout(WAIT_MS);
  t.after(() => context.close());
  return signIn(context, user);
}

/** Opens the app in `context`, signs in as `user` and waits for the stream; answers the page. */
async function signIn(context, user) {
  const page = await context.newPage();
  page.on("pageerror", (error) => pageErrors.push(`${user}: ${error.message}`));
  await page.goto(server.url);
  await page.getByTestId("signin-user").fill(user);
  await page.getByTestId("signin-button").click();
  await waitFor(connection(page, "connected"), `${user}'s stream to connect`);
  return page;
}

/** Starts (or reopens) the direct chat with `peer`; answers its conversation id. */
async function openDirect(page, peer) {
  await page.getByTestId("new-direct").fill(peer);
  await page.getByTestId("new-direct-button").click();
  await waitFor(page.getByTestId("conversation-title").filter({ hasText: exactly(peer) }), `the chat with ${peer} to open`);
  return currentConversation(page);
}

/** The open conversation's id, from its item in the list. */
async function currentConversation(page) {
  const current = page.getByTestId("conversation").and(page.locator('[aria-current="true"]'));
  await waitFor(current, "the open conversation to be marked in the list");
  return current.getAttribute("data-conversation-id");
}

/** Sends `text` in the open conversation and waits until the server has it (a seq). */
async function send(page, text) {
  await page.getByTestId("composer").fill(text);
  await page.getByTestId("composer").press("Enter");
  await waitFor(messageWithBody(page, text).and(page.locator("[data-seq]")), `"${text}" to be sent`);
}

function messageWithBody(page, text) {
  return page.getByTestId("message").filter({ has: page.getByTestId("body").filter({ hasText: exactly(text) }) });
}

function tick(page, text, state) {
  return messageWithBody(page, text).locator(`[data-testid=tick][data-state="${state}"]`);
}

function conversationItem(page, conversationId) {
  return page.locator(`[data-testid=conversation][data-conversation-id="${conversationId}"]`);
}

function connection(page, state) {
  return page.locator(`[data-testid=connection][data-state="${state}"]`);
}

/** Starts recording the states the tick of the message with `text` goes
 * through (from a MutationObserver, so none is missed between two looks);
 * answers a function that reads them. */
async function recordTicks(page, text) {
  await page.evaluate((text) => {
    const states = ((window.tickStates ??= {})[text] = []);
    const record = () => {
      for (const message of document.querySelectorAll("[data-testid=message][data-seq]")) {
        if (message.querySelector("[data-testid=body]")?.textContent !== text) continue;
        const state = message.querySelector("[data-testid=tick]")?.dataset.state;
        if (state && states.at(-1) !== state) states.push(state);
      }
    };
    new MutationObserver(record).observe(document.body, { subtree: true, childList: true, attributes: true });
  }, text);
  return () => page.evaluate((text) => window.tickStates[text], text);
}

/** Waits for the image `selector` names to load; answers its natural size. */
async function loadedImage(page, selector, what) {
  await until(page, (selector) => {
    const image = document.querySelector(selector);
    return image?.complete && image.naturalWidth > 0;
  }, what, selector);
  return page.evaluate((selector) => {
    const image = document.querySelector(selector);
    return { width: image.naturalWidth, height: image.naturalHeight };
  }, selector);
}

/** Two animation frames: whatever the app scheduled to draw has been drawn. */
function nextFrames(page) {
  return page.evaluate(() => new Promise((drawn) => requestAnimationFrame(() => requestAnimationFrame(drawn))));
}

/** The page as a person sees it between two actions: nothing hovered or focused. */
async function screenshot(page, name) {
  await page.mouse.move(0, 0);
  await page.evaluate(() => document.activeElement?.blur());
  await mkdir(screenshots, { recursive: true });
  const path = join(screenshots, name);
  await page.screenshot({ path });
  const written = await readFile(path);
  assert.ok(written.subarray(0, 8).equals(PNG_SIGNATURE), `${path} is not a PNG`);
}

// Waiting.

/** Waits for `locator` to reach `state`; a failure says what was awaited. */
async function waitFor(locator, what, state = "visible") {
  try {
    await locator.waitFor({ state, timeout: WAIT_MS });
  } catch (error) {
    throw awaited(what, error);
  }
}

/** Waits for `predicate(arg)` to hold in the page. */
async function until(page, predicate, what, arg) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: WAIT_MS });
  } catch (error) {
    throw awaited(what, error);
  }
}

/** "waiting for <what>: Timeout 10000ms exceeded." (or a strict mode violation: two matches). */
function awaited(what, error) {
  const why = String(error.message).split("\n")[0].replace(/^[\w.]+: /, "");
  return new Error(`waiting for ${what}: ${why}`, { cause: error });
}

function exactly(text) {
  return new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`);
}

// A real photo.

/** A width x height RGB PNG: a gradient, so it is no blank image. */
function png(width, height) {
  const rows = [];
  for (let y = 0; y < height; y++) {
    const row = Buffer.alloc(1 + width * 3); // filter byte 0, then RGB
    for (let x = 0; x < width; x++) row.set([(x * 255) / width, (y * 255) / height, 160], 1 + x * 3);
    rows.push(row);
  }
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8); // 8 bits per channel, truecolour, no interlace
  return Buffer.concat([PNG_SIGNATURE, chunk("IHDR", header), chunk("IDAT", deflateSync(Buffer.concat(rows))), chunk("IEND", Buffer.alloc(0))]);
}

function chunk(type, data) {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const typed = Buffer.concat([Buffer.from(type, "latin1"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(typed));
  return Buffer.concat([length, typed, crc]);
}

function crc32(bytes) {
  let crc = 0xffffffff;
  for (const byte of bytes) {
    crc ^= byte;
    for (let bit = 0; bit < 8; bit++) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
  }
  return (crc ^ 0xffffffff) >>> 0;
}
