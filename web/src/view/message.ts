// One timeline item: a text message (with its reply quote, photos,
// reactions, tick and actions), a group event, or a send still pending.

import type { Attachment, Entry, PendingSend, Tick } from "../model";
import type { Store } from "../store";
import { fullTime, h, kilobytes, shortTime, type Child } from "./dom";

/** The reactions offered; any single emoji is valid on the wire. */
const EMOJI = ["👍", "❤️", "😂", "😮", "😢", "🙏"];
/** The server refuses edits after this long (docs/clients.md). */
const EDIT_WINDOW_MS = 15 * 60_000;
const THUMBNAIL_BOX = 240;

export interface MessageActions {
  reply(entry: Entry): void;
  edit(entry: Entry): void;
  remove(entry: Entry): void;
  react(entry: Entry, emoji: string): void;
  receipts(entry: Entry, into: HTMLElement): void;
  /** Fills an image with a (thumbnail) URL once it scrolls into view. */
  image(img: HTMLImageElement, entry: Entry, attachment: Attachment, thumbnail: boolean): void;
  open(entry: Entry, attachment: Attachment): void;
  jumpTo(seq: number): void;
  discard(clientMsgId: string): void;
}

export interface MessageContext {
  store: Store;
  actions: MessageActions;
  /** The caller may delete others' messages (group admin or owner). */
  moderator: boolean;
}

export function tickElement(state: Tick | "failed"): HTMLElement {
  const label = { pending: "sending", sent: "sent", delivered: "delivered", read: "read", failed: "not sent" }[state];
  return h("span", { class: "tick", "data-testid": "tick", "data-state": state }, label);
}

function quote(entry: Entry, context: MessageContext): Child {
  if (!entry.replyToSeq) return null;
  const target = context.store.entry(entry.conversationId, entry.replyToSeq);
  const text = !target ? `message #${entry.replyToSeq}` : target.deleted ? "Message deleted" : target.withheld ? "Hidden" : `${target.senderId}: ${target.body || "Photo"}`;
  return h(
    "button",
    { type: "button", class: "quote", "data-testid": "reply-quote", onClick: () => context.actions.jumpTo(entry.replyToSeq) },
    h("span", { class: "visually-hidden" }, "In reply to "),
    text,
  );
}

function attachmentView(entry: Entry, attachment: Attachment, context: MessageContext): HTMLElement {
  if (attachment.mimeType.startsWith("image/")) {
    const scale = attachment.width && attachment.height ? Math.min(1, THUMBNAIL_BOX / attachment.width, THUMBNAIL_BOX / attachment.height) : 0;
    const img = h("img", {
      "data-testid": "thumbnail",
      "data-media-id": attachment.mediaId,
      alt: attachment.fileName || "Photo",
      width: scale ? Math.round(attachment.width * scale) : THUMBNAIL_BOX,
      height: scale ? Math.round(attachment.height * scale) : THUMBNAIL_BOX,
    });
    // Images without a thumbnail (none was made) show the original.
    context.actions.image(img, entry, attachment, attachment.hasThumbnail);
    return h(
      "button",
      { type: "button", class: "thumb", "aria-label": `Open ${attachment.fileName || "photo"} full size`, onClick: () => context.actions.open(entry, attachment) },
      img,
    );
  }
  return h(
    "button",
    { type: "button", class: "file", "data-testid": "file", onClick: () => context.actions.open(entry, attachment) },
    `${attachment.fileName || "File"} (${kilobytes(attachment.size)})`,
  );
}

function reactions(entry: Entry, context: MessageContext): Child {
  const byEmoji = context.store.reactions(entry.conversationId, entry.seq);
  if (!byEmoji.size) return null;
  const mine = context.store.myReaction(entry.conversationId, entry.seq);
  return h(
    "ul",
    { class: "reactions", "aria-label": "Reactions" },
    [...byEmoji].map(([emoji, users]) =>
      h(
        "li",
        {},
        h(
          "button",
          {
            type: "button",
            "data-testid": "reaction",
            "data-emoji": emoji,
            "aria-pressed": emoji === mine ? "true" : "false",
            title: users.join(", "),
            "aria-label": `${emoji} ${users.length}: ${users.join(", ")}`,
            onClick: () => context.actions.react(entry, emoji === mine ? "" : emoji),
          },
          `${emoji} ${users.length}`,
        ),
      ),
    ),
  );
}

function reactMenu(entry: Entry, context: MessageContext): HTMLElement {
  const mine = context.store.myReaction(entry.conversationId, entry.seq);
  const choices = h(
    "div",
    { class: "react-choices", role: "group", "aria-label": "Pick a reaction", hidden: true },
    EMOJI.map((emoji) =>
      h("button", { type: "button", "data-testid": "react-choice", "data-emoji": emoji, "aria-pressed": emoji === mine ? "true" : "false", onClick: () => context.actions.react(entry, emoji === mine ? "" : emoji) }, emoji),
    ),
  );
  const toggle = h("button", { type: "button", "data-testid": "react", "aria-expanded": "false" }, "React");
  toggle.addEventListener("click", () => {
    choices.hidden = !choices.hidden;
    toggle.setAttribute("aria-expanded", String(!choices.hidden));
    if (!choices.hidden) choices.querySelector("button")?.focus();
  });
  choices.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    event.stopPropagation();
    choices.hidden = true;
    toggle.setAttribute("aria-expanded", "false");
    toggle.focus();
  });
  return h("span", { class: "react" }, toggle, choices);
}

function actions(entry: Entry, context: MessageContext, receipts: HTMLElement): HTMLElement {
  const mine = entry.senderId === context.store.me;
  const button = (label: string, testid: string, run: () => void) => h("button", { type: "button", "data-testid": testid, onClick: run }, label);
  return h(
    "div",
    { class: "actions", role: "group", "aria-label": "Message actions" },
    button("Reply", "reply", () => context.actions.reply(entry)),
    reactMenu(entry, context),
    mine && Date.now() - entry.sentAtMs < EDIT_WINDOW_MS && button("Edit", "edit", () => context.actions.edit(entry)),
    (mine || context.moderator) && button("Delete", "delete", () => context.actions.remove(entry)),
    mine && button("Seen by", "receipts", () => context.actions.receipts(entry, receipts)),
  );
}

export function textItem(entry: Entry, context: MessageContext): HTMLLIElement {
  const mine = entry.senderId === context.store.me;
  const receipts = h("p", { class: "receipts", "data-testid": "receipts-text", "aria-live": "polite" });
  return h(
    "li",
    { class: mine ? "message mine" : "message", id: `m-${entry.seq}`, "data-testid": "message", "data-seq": entry.seq, "data-sender": entry.senderId, tabindex: -1 },
    h(
      "div",
      { class: "meta" },
      h("span", { class: "sender" }, mine ? "You" : entry.senderId),
      " ",
      h("time", { datetime: new Date(entry.sentAtMs).toISOString(), title: fullTime(entry.sentAtMs) }, shortTime(entry.sentAtMs)),
      entry.editedAtMs > 0 && !entry.deleted && h("span", { class: "edited", "data-testid": "edited" }, " (edited)"),
    ),
    quote(entry, context),
    entry.deleted
      ? h("p", { class: "body deleted", "data-testid": "body" }, "Message deleted")
      : entry.withheld
        ? h("p", { class: "body deleted", "data-testid": "body" }, "Message hidden")
        : entry.body && h("p", { class: "body", "data-testid": "body" }, entry.body),
    entry.attachments.length > 0 && h("div", { class: "attachments" }, entry.attachments.map((a) => attachmentView(entry, a, context))),
    !entry.deleted && reactions(entry, context),
    mine && tickElement(context.store.tick(entry)),
    mine && receipts,
    !entry.deleted && actions(entry, context, receipts),
  );
}

function eventText(entry: Entry, me: string): string {
  const who = entry.senderId === me ? "You" : entry.senderId;
  const members = entry.memberIds.join(", ");
  switch (entry.kind) {
    case "group_created":
      return `${who} created the group “${entry.title}” with ${members}`;
    case "members_added":
      return `${who} added ${members}`;
    case "member_removed":
      return `${who} removed ${members}`;
    case "member_left":
      return `${who} left`;
    case "renamed":
      return `${who} renamed the group to “${entry.title}”`;
    case "role_changed":
      return `${who} made ${members} ${entry.role}`;
    default:
      return `${who} changed the conversation`;
  }
}

export function eventItem(entry: Entry, me: string): HTMLLIElement {
  return h("li", { class: "event", id: `m-${entry.seq}`, "data-testid": "event", "data-seq": entry.seq }, eventText(entry, me));
}

export function pendingItem(send: PendingSend, context: MessageContext): HTMLLIElement {
  return h(
    "li",
    { class: "message mine pending", "data-testid": "message", "data-pending": "true", "data-client-msg-id": send.clientMsgId },
    h("div", { class: "meta" }, h("span", { class: "sender" }, "You")),
    send.body && h("p", { class: "body", "data-testid": "body" }, send.body),
    send.attachments.map((a) => h("p", { class: "file" }, `${a.fileName || "File"} (${kilobytes(a.size)})`)),
    tickElement(send.failed ? "failed" : "pending"),
    send.failed &&
      h(
        "p",
        { class: "failure" },
        `Not sent: ${send.failed} `,
        h("button", { type: "button", "data-testid": "discard", onClick: () => context.actions.discard(send.clientMsgId) }, "Dismiss"),
      ),
  );
}
