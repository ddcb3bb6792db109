// The signed-in page: a top bar (who, connection status, sign out), the
// sidebar and the conversation pane, and the live regions screen readers
// follow (connection changes, new messages, errors).

import type { ConnectionState } from "../stream";
import { h } from "./dom";

export interface Shell {
  layout: HTMLElement;
  sidebar: HTMLElement;
  pane: HTMLElement;
  connection: HTMLElement;
  who: HTMLElement;
  announcer: HTMLElement;
  alert: HTMLElement;
}

export function shell(root: HTMLElement, userId: string, signOut: () => void): Shell {
  const connection = h("p", {
    class: "connection",
    role: "status",
    "aria-live": "polite",
    "data-testid": "connection",
    "data-state": "reconnecting",
  }, "Connecting…");
  const who = h("span", { class: "who", "data-testid": "me" }, userId);
  const alert = h("p", { class: "alert", role: "alert", "data-testid": "error" });
  const announcer = h("div", { class: "visually-hidden", "aria-live": "polite", "data-testid": "announcer" });
  const sidebar = h("nav", { class: "sidebar", "aria-label": "Conversations" });
  const pane = h("main", { class: "pane", id: "pane", tabindex: -1 });
  const layout = h("div", { class: "layout" }, sidebar, pane);
  root.replaceChildren(
    h("a", { class: "skip", href: "#pane", onClick: skipToComposer }, "Skip to the conversation"),
    h(
      "header",
      { class: "topbar" },
      h("h1", {}, "Messenger"),
      connection,
      h("p", { class: "account" }, "Signed in as ", who, " ", h("button", { type: "button", class: "link", onClick: signOut, "data-testid": "signout" }, "Sign out")),
    ),
    alert,
    layout,
    announcer,
  );
  return { layout, sidebar, pane, connection, who, announcer, alert };
}

/** The page address holds the open conversation, so the skip link moves
 * focus itself instead of changing the address. */
function skipToComposer(event: MouseEvent): void {
  event.preventDefault();
  (document.getElementById("composer-text") ?? document.getElementById("pane"))?.focus();
}

export function showConnection(element: HTMLElement, state: ConnectionState, detail: string): void {
  // Tests and styles see two states: connected, or not (yet) and trying.
  element.dataset.state = state === "connected" ? "connected" : "reconnecting";
  const text = {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    stopped: "Disconnected",
  }[state];
  element.textContent = detail ? `${text} (${detail})` : text;
}

/** Read out by screen readers; the text is replaced, so only the latest is read. */
export function announce(element: HTMLElement, text: string): void {
  element.textContent = text;
}

let alertTimer: ReturnType<typeof setTimeout> | undefined;

/** An error from a call, shown (and announced) for a while. */
export function showError(element: HTMLElement, text: string): void {
  element.textContent = text;
  clearTimeout(alertTimer);
  alertTimer = setTimeout(() => (element.textContent = ""), 10_000);
}
