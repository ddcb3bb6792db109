// The open conversation's header: its name, who is in it (with roles) or
// whether the peer is online, and for groups adding a member and leaving.

import type { Conversation, Member } from "../model";
import type { Store } from "../store";
import { fill, h, shortTime } from "./dom";
import { conversationTitle } from "./sidebar";

export interface HeaderActions {
  back(): void;
  addMember(userId: string): Promise<boolean>;
  leave(): Promise<void>;
}

export class Header {
  readonly element: HTMLElement;
  private readonly title = h("h2", { id: "conversation-title", "data-testid": "conversation-title" });
  private readonly about = h("p", { class: "about", "data-testid": "members" });
  private readonly tools: HTMLElement;
  private readonly leftNotice = h("p", { class: "left", hidden: true }, "You are no longer a member of this group.");

  constructor(
    private readonly store: Store,
    private readonly actions: HeaderActions,
  ) {
    const back = h("button", { type: "button", class: "back", "data-testid": "back", onClick: () => actions.back() }, "Back");
    // Built once and only shown or hidden: redrawing would lose what is being typed.
    this.tools = h(
      "div",
      { class: "tools" },
      this.addForm(),
      h("button", { type: "button", "data-testid": "leave", onClick: () => void this.actions.leave() }, "Leave group"),
    );
    this.element = h("header", { class: "conversation-header" }, back, h("div", { class: "heading" }, this.title, this.about), this.tools, this.leftNotice);
  }

  render(conversation: Conversation, left: boolean): void {
    const me = this.store.me;
    this.title.textContent = conversationTitle(conversation, me);
    const members = this.store.members(conversation.id);
    if (conversation.isGroup) {
      fill(this.about, "Members: ", membersText(members, conversation.memberIds));
    } else {
      fill(this.about, this.presenceText(conversation.memberIds.find((id) => id !== me)));
    }
    this.tools.hidden = !conversation.isGroup || left;
    this.leftNotice.hidden = !left;
  }

  private presenceText(peer: string | undefined): string {
    const presence = peer ? this.store.presence.get(peer) : undefined;
    if (!presence) return "";
    return presence.online ? "Online" : `Last seen ${shortTime(presence.lastSeenMs)}`;
  }

  private addForm(): HTMLFormElement {
    const input = h("input", { id: "add-member", autocomplete: "off", required: true, "data-testid": "add-member" });
    const form = h(
      "form",
      { class: "add-member" },
      h("label", { for: "add-member" }, "Add member"),
      input,
      h("button", { type: "submit", "data-testid": "add-member-button" }, "Add"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const id = input.value.trim();
      if (id) void this.actions.addMember(id).then((added) => added && (input.value = ""));
    });
    return form;
  }
}

function membersText(members: Member[] | undefined, memberIds: string[]): string {
  if (!members) return memberIds.join(", ");
  return members.map((m) => (m.role === "owner" || m.role === "admin" ? `${m.userId} (${m.role})` : m.userId)).join(", ");
}
