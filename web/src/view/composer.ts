// The message box: Enter sends, Shift+Enter is a new line, Escape leaves
// reply or edit mode. Typing hints go out while the person types, at most
// one per TYPING_EVERY_MS (the server keeps one alive for 5 s and drops
// more than 2 per second); a photo is uploaded and sent with the box's text
// as its caption.

import type { Entry } from "../model";
import { h } from "./dom";

const TYPING_EVERY_MS = 3_000;
/** Without a keystroke for this long the person has stopped typing. */
const TYPING_IDLE_MS = 4_000;
const PROGRESS_LINGER_MS = 1_000;

export interface ComposerActions {
  send(body: string, replyToSeq: number): void;
  edit(seq: number, body: string): Promise<boolean>;
  typing(active: boolean): void;
  attach(file: File, caption: string, progress: HTMLProgressElement): Promise<boolean>;
}

type Mode = { kind: "new" } | { kind: "reply"; entry: Entry } | { kind: "edit"; entry: Entry };

export class Composer {
  readonly element: HTMLFormElement;
  private readonly text = h("textarea", {
    id: "composer-text",
    rows: 2,
    placeholder: "Write a message",
    "aria-describedby": "composer-hint",
    "data-testid": "composer",
  });
  private readonly file = h("input", { type: "file", id: "composer-file", class: "visually-hidden", "data-testid": "file-input" });
  private readonly progress = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "Upload progress", "data-testid": "upload-progress" });
  private readonly sendButton = h("button", { type: "submit", "data-testid": "send" }, "Send");
  private readonly modeText = h("span", { "data-testid": "composer-mode-text" });
  private readonly modeBar = h(
    "div",
    { class: "mode", hidden: true, "data-testid": "composer-mode" },
    this.modeText,
    h("button", { type: "button", class: "link", "data-testid": "cancel-mode", onClick: () => this.reset() }, "Cancel"),
  );
  private mode: Mode = { kind: "new" };
  private typingSentAt = 0;
  private idleTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(private readonly actions: ComposerActions) {
    this.element = h(
      "form",
      { class: "composer", "aria-label": "New message" },
      this.modeBar,
      h("label", { for: "composer-text", class: "visually-hidden" }, "Message"),
      h("p", { id: "composer-hint", class: "visually-hidden" }, "Enter sends, Shift+Enter starts a new line, Escape cancels a reply or an edit."),
      h(
        "div",
        { class: "row" },
        this.text,
        h("label", { for: "composer-file", class: "button attach", title: "The text in the box goes with it as a caption" }, "Photo", this.file),
        this.sendButton,
      ),
      this.progress,
    );
    this.element.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.submit();
    });
    this.text.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        void this.submit();
      } else if (event.key === "Escape" && this.mode.kind !== "new") {
        event.preventDefault();
        this.reset();
      }
    });
    this.text.addEventListener("input", () => this.typed());
    this.file.addEventListener("change", () => void this.attach());
  }

  focus(): void {
    this.text.focus();
  }

  replyTo(entry: Entry): void {
    this.mode = { kind: "reply", entry };
    this.showMode(`Replying to ${entry.senderId}: ${entry.body || "Photo"}`);
    this.focus();
  }

  edit(entry: Entry): void {
    this.mode = { kind: "edit", entry };
    this.text.value = entry.body;
    this.showMode(`Editing your message`);
    this.sendButton.textContent = "Save";
    this.focus();
  }

  /** The member left or was removed: nothing can be sent any more. */
  disable(reason: string): void {
    for (const control of [this.text, this.file, this.sendButton]) control.disabled = true;
    this.text.placeholder = reason;
  }

  private showMode(text: string): void {
    this.modeText.textContent = text;
    this.modeBar.hidden = false;
  }

  private reset(): void {
    if (this.mode.kind === "edit") this.text.value = "";
    this.mode = { kind: "new" };
    this.modeBar.hidden = true;
    this.sendButton.textContent = "Send";
    this.focus();
  }

  private typed(): void {
    clearTimeout(this.idleTimer);
    if (!this.text.value.trim() || this.mode.kind === "edit") {
      this.stopTyping();
      return;
    }
    if (Date.now() - this.typingSentAt > TYPING_EVERY_MS) {
      this.typingSentAt = Date.now();
      this.actions.typing(true);
    }
    this.idleTimer = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  private stopTyping(): void {
    clearTimeout(this.idleTimer);
    if (!this.typingSentAt) return;
    this.typingSentAt = 0;
    this.actions.typing(false);
  }

  private async submit(): Promise<void> {
    const body = this.text.value;
    if (!body.trim()) return;
    this.stopTyping();
    const mode = this.mode;
    if (mode.kind === "edit") {
      if (await this.actions.edit(mode.entry.seq, body)) this.reset();
      return;
    }
    this.actions.send(body, mode.kind === "reply" ? mode.entry.seq : 0);
    this.text.value = "";
    if (mode.kind === "reply") this.reset();
  }

  private async attach(): Promise<void> {
    const file = this.file.files?.[0];
    if (!file) return;
    this.file.disabled = true;
    this.progress.value = 0;
    this.progress.hidden = false;
    const caption = this.mode.kind === "edit" ? "" : this.text.value.trim();
    try {
      if (await this.actions.attach(file, caption, this.progress)) {
        if (caption) this.text.value = "";
      }
    } finally {
      this.file.value = "";
      this.file.disabled = false;
      // Full for a moment, so a fast upload is seen to finish rather than flicker.
      setTimeout(() => {
        if (!this.file.disabled) this.progress.hidden = true; // unless another upload began
      }, PROGRESS_LINGER_MS);
    }
  }
}
