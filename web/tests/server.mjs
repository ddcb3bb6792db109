// Starts the real system for one browser test file: `messenger up` with every
// port on 127.0.0.1:0 and its data in a fresh temporary directory. The
// binary is ${MESSENGER_BIN:-target/debug/messenger}, relative to the
// repository root; it prints `web app: http://127.0.0.1:PORT/ ...` once it
// serves, and that URL is what the tests open.

import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const UP_WITHIN_MS = 30_000;
const EXIT_WITHIN_MS = 10_000;
/** What is kept of the server's stderr for error messages. */
const STDERR_TAIL_BYTES = 16_384;
/** Variables for the tests, not the server (which refuses MESSENGER_* it does not know). */
const TEST_VARIABLES = ["MESSENGER_BIN", "MESSENGER_SCREENSHOTS"];

/** Starts the server; answers its web app's URL and a way to stop it. */
export async function start() {
  const dir = await mkdtemp(join(tmpdir(), "messenger-browser-"));
  const configFile = join(dir, "messenger.toml");
  await writeFile(configFile, config(join(dir, "data")));
  const binary = resolve(REPO, process.env.MESSENGER_BIN || "target/debug/messenger");
  const env = { ...process.env };
  for (const name of TEST_VARIABLES) delete env[name];
  const child = spawn(binary, ["--config", configFile, "up"], { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
  // A test run that dies without stop() must not leave the server behind.
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);

  let stderr = "";
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (chunk) => (stderr = (stderr + chunk).slice(-STDERR_TAIL_BYTES)));
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve(signal ?? code)));

  const stop = async () => {
    process.removeListener("exit", killOnExit);
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), EXIT_WITHIN_MS);
      await exited;
      clearTimeout(timer);
    }
    await rm(dir, { recursive: true, force: true });
  };

  try {
    const url = await webUrl(child, exited, () => stderr, binary);
    await checkServesBuiltApp(url);
    return { url, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}

function config(dataDir) {
  // A JSON string is a valid TOML basic string.
  return `data_dir = ${JSON.stringify(dataDir)}
[admin]
listen = "127.0.0.1:0"
[gateway]
listen = "127.0.0.1:0"
internal_listen = "127.0.0.1:0"
[gateway.web]
listen = "127.0.0.1:0"
[message]
listen = "127.0.0.1:0"
[presence]
listen = "127.0.0.1:0"
[media]
listen = "127.0.0.1:0"
[media.s3]
embedded_listen = "127.0.0.1:0"
[notify]
listen = "127.0.0.1:0"
`;
}

/** Reads stdout up to the `web app:` line; fails with stderr if the server exits or takes too long. */
function webUrl(child, exited, stderr, binary) {
  return new Promise((resolve, reject) => {
    let stdout = "";
    const fail = (why) => {
      clearTimeout(timer);
      reject(new Error(`${binary} up ${why}; its stderr ends with:\n${stderr()}`));
    };
    const timer = setTimeout(() => fail(`printed no "web app:" line within ${UP_WITHIN_MS / 1000} s`), UP_WITHIN_MS);
    exited.then((status) => fail(`exited (${status}) before printing "web app:"`));
    child.once("error", (error) => fail(`could not start: ${error.message}`));
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      stdout += chunk;
      const found = /^web app: (http:\/\/\S+)/m.exec(stdout);
      if (!found) return;
      clearTimeout(timer);
      child.stdout.removeAllListeners("data");
      child.stdout.resume(); // keep draining, so the server never blocks on a full pipe
      resolve(found[1]);
    });
  });
}

/**
 * The binary embeds the app at its build (include_bytes!): one built before
 * the last change to web/ would test old code. Say so instead.
 */
async function checkServesBuiltApp(url) {
  const assets = [
    ["", "web/src/index.html"],
    ["app.js", "web/dist/app.js"],
    ["app.css", "web/src/app.css"],
  ];
  for (const [path, file] of assets) {
    const served = Buffer.from(await (await fetch(new URL(path, url))).arrayBuffer());
    const built = await readFile(join(REPO, file));
    if (!served.equals(built)) {
      throw new Error(`the server serves a different ${file} than the repository holds: rebuild the binary (cargo build) after web/build.sh`);
    }
  }
}
