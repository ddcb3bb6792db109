// The open conversation's messages, oldest first, drawn item by item: an
// entry that changes redraws only its own item (and the replies quoting it),
// so a long conversation stays fast and keyboard focus stays put.

import type { Entry, PendingSend } from "../model";
import { h } from "./dom";
import { eventItem, pendingItem, textItem, tickElement, type MessageContext } from "./message";

/** Within this distance of the bottom the view follows new messages. */
const FOLLOW_PX = 80;

export class Timeline {
  readonly element: HTMLElement;
  readonly loadOlder: HTMLButtonElement;
  private readonly list = h("ol", { class: "timeline", "aria-label": "Messages", "data-testid": "timeline" });
  private readonly pending = h("ol", { class: "timeline pending-list", "aria-label": "Sending" });
  private readonly items = new Map<number, HTMLLIElement>();
  /** Seqs drawn, ascending, to find where a new item goes. */
  private seqs: number[] = [];

  constructor(
    private readonly conversationId: string,
    private readonly context: MessageContext,
    older: () => void,
  ) {
    this.loadOlder = h("button", { type: "button", class: "load-older", "data-testid": "load-older", hidden: true, onClick: older }, "Load older messages");
    this.element = h("div", { class: "scroller" }, this.loadOlder, this.list, this.pending);
  }

  private render(entry: Entry): HTMLLIElement {
    return entry.kind === "text" ? textItem(entry, this.context) : eventItem(entry, this.context.store.me);
  }

  /** Draws (again) the given seqs and every item quoting one of them. */
  update(seqs: number[]): void {
    const store = this.context.store;
    const changed = new Set(seqs);
    for (const seq of this.seqs) {
      const replyTo = store.entry(this.conversationId, seq)?.replyToSeq;
      if (replyTo && changed.has(replyTo)) changed.add(seq);
    }
    this.keepingScroll(() => {
      for (const seq of changed) {
        const entry = store.entry(this.conversationId, seq);
        if (!entry || !store.isShown(entry)) continue;
        const item = this.render(entry);
        const old = this.items.get(seq);
        if (old) {
          const hadFocus = old.contains(document.activeElement);
          old.replaceWith(item);
          if (hadFocus) item.focus();
        } else {
          this.insert(seq, item);
        }
        this.items.set(seq, item);
      }
    });
  }

  private insert(seq: number, item: HTMLLIElement): void {
    let low = 0;
    let high = this.seqs.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (this.seqs[middle]! < seq) low = middle + 1;
      else high = middle;
    }
    const next = this.seqs[low];
    this.list.insertBefore(item, next === undefined ? null : (this.items.get(next) ?? null));
    this.seqs.splice(low, 0, seq);
  }

  showPending(sends: PendingSend[]): void {
    this.keepingScroll(() => this.pending.replaceChildren(...sends.map((send) => pendingItem(send, this.context))));
  }

  /** Members' cursors moved: only the ticks change. */
  updateTicks(): void {
    for (const [seq, item] of this.items) {
      const tick = item.querySelector(":scope > .tick");
      const entry = this.context.store.entry(this.conversationId, seq);
      if (tick && entry) tick.replaceWith(tickElement(this.context.store.tick(entry)));
    }
  }

  setHasMore(hasMore: boolean): void {
    this.loadOlder.hidden = !hasMore;
  }

  scrollToEnd(): void {
    this.element.scrollTop = this.element.scrollHeight;
  }

  jumpTo(seq: number): boolean {
    const item = this.items.get(seq);
    if (!item) return false;
    item.scrollIntoView({ block: "center" });
    item.focus();
    return true;
  }

  /**
   * Changes the list without moving what the reader sees: at the bottom it
   * follows new messages; elsewhere the first visible item stays where it
   * was (older messages added above must not push it away). Done here, not
   * with CSS overflow-anchor, which Safari lacks.
   */
  private keepingScroll(change: () => void): void {
    const scroller = this.element;
    const atEnd = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < FOLLOW_PX;
    const top = scroller.getBoundingClientRect().top;
    const anchor = [...this.list.children].find((item) => item.getBoundingClientRect().bottom > top);
    const before = anchor?.getBoundingClientRect().top ?? 0;
    change();
    if (atEnd) scroller.scrollTop = scroller.scrollHeight;
    else if (anchor?.isConnected) scroller.scrollTop += anchor.getBoundingClientRect().top - before;
  }
}
