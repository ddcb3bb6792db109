// The full-size photo view: a modal <dialog>, so Escape closes it, focus
// stays inside while it is open and goes back to the thumbnail after.

import { h } from "./dom";

export class Viewer {
  private readonly image = h("img", { "data-testid": "full-image", alt: "" });
  private readonly caption = h("p", { class: "caption" });
  private readonly dialog: HTMLDialogElement;
  private opener: HTMLElement | null = null;

  constructor(root: HTMLElement) {
    const close = h("button", { type: "button", class: "close", "data-testid": "viewer-close", onClick: () => this.dialog.close() }, "Close");
    this.dialog = h("dialog", { class: "viewer", "aria-label": "Photo", "data-testid": "viewer" }, close, this.image, this.caption);
    // A click on the backdrop (outside the image) closes too.
    this.dialog.addEventListener("click", (event) => {
      if (event.target === this.dialog) this.dialog.close();
    });
    this.dialog.addEventListener("close", () => {
      this.image.removeAttribute("src");
      this.opener?.focus();
    });
    root.append(this.dialog);
  }

  show(url: string, name: string): void {
    this.opener = document.activeElement as HTMLElement | null;
    this.image.src = url;
    this.image.alt = name;
    this.caption.textContent = name;
    if (!this.dialog.open) this.dialog.showModal();
  }
}
