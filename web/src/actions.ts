// What the buttons do: each action is one API call (or an upload), its
// answer applied to the store at once (the same entry arriving later on the
// stream is then dropped as already seen), and its failure shown.

import type { App } from "./app";
import { conversation as toConversation, entry as toEntry } from "./convert";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { ModifyMessageRequestSchema, UpdateGroupRequestSchema } from "../gen/messenger/v1/gateway_pb";
import type { Attachment, Entry } from "./model";
import { upload } from "./upload";
import type { ComposerActions } from "./view/composer";
import type { HeaderActions } from "./view/header";
import type { MessageContext } from "./view/message";
import { announce } from "./view/shell";
import { conversationTitle, type SidebarActions } from "./view/sidebar";

type ConversationActions = HeaderActions & ComposerActions & { older(): void };
type GroupChange = MessageInitShape<typeof UpdateGroupRequestSchema>["change"];
type MessageChange = MessageInitShape<typeof ModifyMessageRequestSchema>["change"];

export class Actions implements SidebarActions {
  /** Loads an image's URL only when it nears the screen: each is a call. */
  private readonly images = new IntersectionObserver((seen) => this.imagesSeen(seen), { rootMargin: "300px" });
  private readonly imageLoaders = new WeakMap<Element, () => void>();

  constructor(private readonly app: App) {}

  open(conversationId: string): void {
    this.app.open(conversationId);
  }

  async newDirect(peerId: string): Promise<boolean> {
    try {
      return this.opened((await this.app.api.getOrCreateDirect({ peerId })).conversation);
    } catch (error) {
      this.app.error(error);
      return false;
    }
  }

  async newGroup(title: string, memberIds: string[]): Promise<boolean> {
    try {
      return this.opened((await this.app.api.createGroup({ title, memberIds })).conversation);
    } catch (error) {
      this.app.error(error);
      return false;
    }
  }

  private opened(conversation: Parameters<typeof toConversation>[0] | undefined): boolean {
    if (!conversation) return false;
    this.app.store.putConversation(toConversation(conversation));
    this.app.open(conversation.conversationId);
    return true;
  }

  /** A change's answer is the entry recording it (none when nothing changed). */
  private applied(conversationId: string, event: Parameters<typeof toEntry>[0] | undefined): void {
    if (event) this.app.store.addEntries(conversationId, [toEntry(event)], "stream");
  }

  private async updateGroup(conversationId: string, change: GroupChange): Promise<boolean> {
    try {
      const answer = await this.app.api.updateGroup({ conversationId, change });
      this.applied(conversationId, answer.event);
      return true;
    } catch (error) {
      this.app.error(error);
      return false;
    }
  }

  private async modify(conversationId: string, targetSeq: number, change: MessageChange): Promise<boolean> {
    try {
      const answer = await this.app.api.modifyMessage({ conversationId, targetSeq: BigInt(targetSeq), change });
      this.applied(conversationId, answer.event);
      return true;
    } catch (error) {
      this.app.error(error);
      return false;
    }
  }

  forConversation(id: string): ConversationActions {
    const app = this.app;
    return {
      back: () => app.close(),
      older: () => void app.loadHistory(id, app.store.oldestSeq(id)),
      addMember: async (userId) => {
        const added = await this.updateGroup(id, { case: "addMembers", value: { userIds: [userId] } });
        if (added) void app.loadMembers(id);
        return added;
      },
      leave: async () => {
        const conversation = app.store.conversations.get(id);
        const title = conversation ? conversationTitle(conversation, app.store.me) : "the group";
        if (!(await this.updateGroup(id, { case: "leave", value: true }))) return;
        app.store.removeConversation(id);
        app.close();
        announce(app.shell.announcer, `You left ${title}`);
      },
      send: (body, replyToSeq) => app.sync.send(id, body, replyToSeq),
      edit: (seq, body) => this.modify(id, seq, { case: "edit", value: body }),
      typing: (active) => app.sync.typing(id, active),
      attach: async (file, caption, progress) => {
        try {
          const attachment = await upload(app.api, id, file, (sent, total) => (progress.value = total ? sent / total : 1));
          app.sync.send(id, caption, 0, { mediaIds: [attachment.mediaId], attachments: [attachment] });
          return true;
        } catch (error) {
          app.error(error);
          return false;
        }
      },
    };
  }

  messageContext(id: string): MessageContext {
    const app = this.app;
    return {
      store: app.store,
      // Group admins and owners may delete others' messages.
      get moderator() {
        const me = app.store.members(id)?.find((m) => m.userId === app.store.me);
        return !!app.store.conversations.get(id)?.isGroup && (me?.role === "admin" || me?.role === "owner");
      },
      actions: {
        reply: (entry) => app.view?.composer.replyTo(entry),
        edit: (entry) => app.view?.composer.edit(entry),
        remove: (entry) => void this.modify(id, entry.seq, { case: "delete", value: true }),
        react: (entry, emoji) => void this.modify(id, entry.seq, { case: "react", value: emoji }),
        receipts: (entry, into) => void this.receipts(entry, into),
        image: (img, entry, attachment, thumbnail) => this.lazyImage(img, entry, attachment, thumbnail),
        open: (entry, attachment) => void this.openAttachment(entry, attachment),
        jumpTo: (seq) => app.view?.timeline.jumpTo(seq),
        discard: (clientMsgId) => app.sync.outbox.discard(clientMsgId),
      },
    };
  }

  /** Who has the message and who read it (for any group size; live receipts stop at 32 members). */
  private async receipts(entry: Entry, into: HTMLElement): Promise<void> {
    try {
      const answer = await this.app.api.getReceipts({ conversationId: entry.conversationId, seq: BigInt(entry.seq) });
      const list = (ids: string[]) => (ids.length ? ids.join(", ") : "nobody yet");
      into.textContent = `Read by: ${list(answer.readBy)}. Delivered to: ${list(answer.deliveredTo)}.`;
    } catch (error) {
      this.app.error(error);
    }
  }

  private lazyImage(img: HTMLImageElement, entry: Entry, attachment: Attachment, thumbnail: boolean): void {
    const media = this.app.media;
    const load = (retry: boolean) =>
      media
        .get(entry.conversationId, entry.seq, attachment.mediaId, thumbnail)
        .then((url) => {
          img.onerror = retry
            ? () => {
                // Expired early or clocks differ: ask for a fresh URL once.
                media.forget(entry.conversationId, entry.seq, attachment.mediaId, thumbnail);
                void load(false);
              }
            : null;
          img.src = url;
        })
        .catch(() => (img.alt = `${attachment.fileName || "Photo"} (unavailable)`));
    this.imageLoaders.set(img, () => void load(true));
    this.images.observe(img);
  }

  private imagesSeen(seen: IntersectionObserverEntry[]): void {
    for (const sight of seen) {
      // An item drawn again replaced its image: stop watching the old one.
      if (!sight.target.isConnected) this.images.unobserve(sight.target);
      if (!sight.isIntersecting) continue;
      this.images.unobserve(sight.target);
      this.imageLoaders.get(sight.target)?.();
      this.imageLoaders.delete(sight.target);
    }
  }

  /** Photos open in the viewer; other files in a new tab (storage serves them as downloads). */
  private async openAttachment(entry: Entry, attachment: Attachment): Promise<void> {
    try {
      const url = await this.app.media.get(entry.conversationId, entry.seq, attachment.mediaId, false);
      if (attachment.mimeType.startsWith("image/")) this.app.viewer.show(url, attachment.fileName || "Photo");
      else window.open(url, "_blank", "noopener");
    } catch (error) {
      this.app.error(error);
    }
  }
}
