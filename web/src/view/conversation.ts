// The conversation pane: header, timeline, who is typing, and the composer,
// for one open conversation. It draws what the store holds; the app decides
// what to fetch and send.

import type { Store } from "../store";
import { Composer, type ComposerActions } from "./composer";
import { h } from "./dom";
import { Header, type HeaderActions } from "./header";
import type { MessageContext } from "./message";
import { Timeline } from "./timeline";

export class ConversationView {
  readonly element: HTMLElement;
  readonly header: Header;
  readonly timeline: Timeline;
  readonly composer: Composer;
  private readonly typingLine = h("p", { class: "typing", "data-testid": "typing" });
  private disabled = false;

  constructor(
    readonly conversationId: string,
    private readonly store: Store,
    context: MessageContext,
    actions: HeaderActions & ComposerActions & { older(): void },
  ) {
    this.header = new Header(store, actions);
    this.timeline = new Timeline(conversationId, context, () => actions.older());
    this.composer = new Composer(actions);
    this.element = h(
      "section",
      { class: "chat", "aria-labelledby": "conversation-title", "data-conversation-id": conversationId },
      this.header.element,
      this.timeline.element,
      this.typingLine,
      this.composer.element,
    );
  }

  /** Title, members, and whether the caller is still a member. */
  renderHeader(): void {
    const conversation = this.store.conversations.get(this.conversationId);
    const left = this.store.hasLeft(this.conversationId);
    if (conversation) this.header.render(conversation, left);
    if (left && !this.disabled) {
      this.disabled = true;
      this.composer.disable("You are no longer a member");
    }
  }

  renderTyping(): void {
    const typists = this.store.typists(this.conversationId);
    this.typingLine.textContent =
      typists.length === 0 ? "" : typists.length === 1 ? `${typists[0]} is typing…` : `${typists.join(", ")} are typing…`;
  }
}
