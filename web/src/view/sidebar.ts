// The sidebar: start a direct chat or a group, and the conversation list
// (most recent first, with unread counts and a preview of the last message).

import type { Conversation, Entry } from "../model";
import type { Store } from "../store";
import { fill, h, shortTime } from "./dom";

export interface SidebarActions {
  open(conversationId: string): void;
  /** Each answers whether it worked (its failure is already shown). */
  newDirect(peerId: string): Promise<boolean>;
  newGroup(title: string, memberIds: string[]): Promise<boolean>;
}

/** A direct conversation is named after the other member. */
export function conversationTitle(conversation: Conversation, me: string): string {
  if (conversation.isGroup) return conversation.title || "Untitled group";
  const peers = conversation.memberIds.filter((id) => id !== me);
  return peers.length ? peers.join(", ") : "Notes to self";
}

export function preview(entry: Entry | undefined, me: string, isGroup: boolean): string {
  if (!entry) return "No messages yet";
  let text = entry.body;
  if (entry.deleted) text = "Message deleted";
  else if (entry.withheld) text = "Hidden";
  else if (!text && entry.attachments.length) text = entry.attachments[0]!.mimeType.startsWith("image/") ? "Photo" : entry.attachments[0]!.fileName || "File";
  if (entry.senderId === me) return `You: ${text}`;
  return isGroup ? `${entry.senderId}: ${text}` : text;
}

export class Sidebar {
  private readonly list = h("ul", { class: "conversations", "data-testid": "conversation-list" });

  constructor(
    root: HTMLElement,
    private readonly store: Store,
    private readonly actions: SidebarActions,
  ) {
    root.replaceChildren(this.directForm(), this.groupForm(), h("h2", { class: "visually-hidden" }, "Your conversations"), this.list);
  }

  private directForm(): HTMLFormElement {
    const peer = h("input", { id: "new-direct", name: "peer", autocomplete: "off", required: true, "data-testid": "new-direct" });
    const form = h(
      "form",
      { class: "new-direct" },
      h("label", { for: "new-direct" }, "New chat with user"),
      h("div", { class: "row" }, peer, h("button", { type: "submit", "data-testid": "new-direct-button" }, "Start")),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const id = peer.value.trim();
      if (id) void this.actions.newDirect(id).then((done) => done && (peer.value = ""));
    });
    return form;
  }

  private groupForm(): HTMLFormElement {
    const title = h("input", { id: "new-group-title", name: "title", required: true, maxlength: 256, "data-testid": "new-group-title" });
    const members = h("input", {
      id: "new-group-members",
      name: "members",
      autocomplete: "off",
      "aria-describedby": "new-group-hint",
      "data-testid": "new-group-members",
    });
    const form = h(
      "form",
      { class: "new-group" },
      h("h2", {}, "New group"),
      h("label", { for: "new-group-title" }, "Group title"),
      title,
      h("label", { for: "new-group-members" }, "Members"),
      members,
      h("p", { class: "hint", id: "new-group-hint" }, "User ids, separated by commas"),
      h("button", { type: "submit", "data-testid": "new-group-button" }, "Create group"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const ids = members.value.split(",").map((id) => id.trim()).filter(Boolean);
      if (!title.value.trim()) return;
      void this.actions.newGroup(title.value.trim(), ids).then((done) => done && form.reset());
    });
    return form;
  }

  render(currentId: string | undefined): void {
    const focused = (document.activeElement as HTMLElement | null)?.dataset?.conversationId;
    const items = this.store.sortedConversations().map((conversation) => this.item(conversation, conversation.id === currentId));
    fill(this.list, items.length ? items : [h("li", { class: "empty" }, "No conversations yet: start one above.")]);
    if (focused) this.list.querySelector<HTMLElement>(`[data-conversation-id="${CSS.escape(focused)}"]`)?.focus();
  }

  private item(conversation: Conversation, current: boolean): HTMLLIElement {
    const me = this.store.me;
    const unread = conversation.unreadCount;
    const button = h(
      "button",
      {
        type: "button",
        class: "conversation",
        "data-testid": "conversation",
        "data-conversation-id": conversation.id,
        "aria-current": current ? "true" : undefined,
      },
      h("span", { class: "title" }, conversationTitle(conversation, me)),
      h("span", { class: "time" }, shortTime(conversation.lastActivityMs)),
      h("span", { class: "preview" }, preview(conversation.lastMessage, me, conversation.isGroup)),
      unread > 0 &&
        h("span", { class: "unread", "data-testid": "unread" }, String(unread), h("span", { class: "visually-hidden" }, " unread")),
    );
    button.addEventListener("click", () => this.actions.open(conversation.id));
    return h("li", {}, button);
  }
}
