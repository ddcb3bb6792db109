// The signed-in app: builds the parts, routes store changes to the views,
// and opens conversations (history pages, members, read marks). What each
// button does with the API is in actions.ts.

import { describeError, devToken, gateway, retried, type Gateway } from "./api";
import { Actions } from "./actions";
import { conversation as toConversation, entry as toEntry, members as toMembers } from "./convert";
import { MediaUrls } from "./media";
import type { Entry } from "./model";
import { deviceId, saveCredentials, type Credentials } from "./session";
import { Store, type Change } from "./store";
import { Stream } from "./stream";
import { Sync } from "./sync";
import { ConversationView } from "./view/conversation";
import { coalesced, h } from "./view/dom";
import { announce, shell, showConnection, showError, type Shell } from "./view/shell";
import { Sidebar } from "./view/sidebar";
import { Viewer } from "./view/viewer";

const HISTORY_PAGE = 50;
const INBOX_PAGE = 200;
/** A token refreshed this recently and refused again means signing in by hand. */
const REFRESH_AT_MOST_EVERY_MS = 30_000;

export class App {
  readonly store = new Store();
  readonly api: Gateway;
  readonly stream: Stream;
  readonly sync: Sync;
  readonly media: MediaUrls;
  readonly shell: Shell;
  readonly viewer: Viewer;
  readonly actions: Actions;
  private readonly sidebar: Sidebar;
  view: ConversationView | undefined;
  private refreshedAt = 0;
  private reauthenticating: Promise<void> | undefined;
  private listing: Promise<void> | undefined;
  private listAgain = false;
  /** Ends the page-wide listeners when the person signs out. */
  private readonly lifetime = new AbortController();
  /** Seqs of the open conversation to draw at the next frame. */
  private redraw = new Set<number>();

  constructor(
    root: HTMLElement,
    private credentials: Credentials,
    private readonly signOut: (notice: string) => void,
  ) {
    this.store.me = credentials.userId;
    this.api = gateway(() => this.credentials.token, () => void this.reauthenticate());
    this.media = new MediaUrls(this.api);
    this.shell = shell(root, credentials.userId, () => this.signOut(""));
    this.viewer = new Viewer(root);
    this.stream = new Stream(deviceId(), () => this.credentials.token, {
      ready: (userId) => this.ready(userId),
      frame: (frame) => this.sync.frame(frame),
      state: (state, detail) => showConnection(this.shell.connection, state, detail),
      unauthenticated: () => void this.reauthenticate(),
    });
    this.sync = new Sync(credentials.userId, this.store, this.stream, {
      arrived: (conversationId, entries) => this.arrived(conversationId, entries),
      unknownConversation: this.refreshConversations,
      pendingChanged: (conversationId) => {
        if (this.view?.conversationId === conversationId) this.view.timeline.showPending(this.sync.outbox.of(conversationId));
      },
      error: (text) => showError(this.shell.alert, text),
    });
    this.actions = new Actions(this);
    this.sidebar = new Sidebar(this.shell.sidebar, this.store, this.actions);
    this.store.subscribe((change) => this.changed(change));
    const signal = this.lifetime.signal;
    document.addEventListener("visibilitychange", () => this.markRead(), { signal });
    addEventListener("focus", () => this.markRead(), { signal });
    this.showEmptyPane();
  }

  start(): void {
    this.stream.start();
    this.refreshConversations();
  }

  stop(): void {
    this.lifetime.abort();
    this.stream.stop();
  }

  error(error: unknown): void {
    showError(this.shell.alert, describeError(error));
  }

  private ready(userId: string): void {
    if (userId && userId !== this.credentials.userId) {
      // A pasted token names its user; the server's word is final.
      this.credentials = { ...this.credentials, userId };
      saveCredentials(this.credentials);
      this.shell.who.textContent = userId;
    }
    this.store.me = userId || this.store.me;
    this.sync.ready();
    this.refreshConversations();
    if (this.view) void this.loadMembers(this.view.conversationId);
    this.markRead();
  }

  /** The token was refused: a development server hands out a new one; else sign in again. */
  private reauthenticate(): Promise<void> {
    this.reauthenticating ??= (async () => {
      try {
        if (Date.now() - this.refreshedAt < REFRESH_AT_MOST_EVERY_MS) throw new Error("refused again");
        this.refreshedAt = Date.now();
        const token = await devToken(this.credentials.userId);
        if (!token) throw new Error("no development tokens here");
        this.credentials = { ...this.credentials, token };
        saveCredentials(this.credentials);
        this.stream.restart();
      } catch {
        this.signOut("Your session ended; sign in again.");
      } finally {
        this.reauthenticating = undefined;
      }
    })();
    return this.reauthenticating;
  }

  /** The inbox, asked again. Asks while a call is on its way make one more
   * call after it, not one each (a new device's backlog names many
   * conversations the inbox has not listed yet). */
  readonly refreshConversations = (): void => {
    if (this.listing) {
      this.listAgain = true;
      return;
    }
    this.listing = retried(() => this.api.listConversations({ limit: INBOX_PAGE }))
      .then((answer) => this.store.setConversations(answer.conversations.map(toConversation)))
      .then(() => this.openFromAddress())
      .catch((error: unknown) => this.error(error))
      .finally(() => {
        this.listing = undefined;
        if (this.listAgain) {
          this.listAgain = false;
          this.refreshConversations();
        }
      });
  };

  private changed(change: Change): void {
    const view = this.view;
    switch (change.kind) {
      case "conversations":
        this.renderSidebar();
        if (view) this.renderHeader();
        return;
      case "entries":
        if (view?.conversationId !== change.conversationId) return;
        for (const seq of change.seqs) this.redraw.add(seq);
        this.drawEntries();
        return;
      case "members":
        if (view?.conversationId !== change.conversationId) return;
        view.timeline.updateTicks();
        this.renderHeader();
        return;
      case "typing":
        if (view?.conversationId === change.conversationId) view.renderTyping();
        return;
      case "presence":
        if (view) this.renderHeader();
        return;
    }
  }

  private readonly renderSidebar = coalesced(() => this.sidebar.render(this.view?.conversationId));
  private readonly renderHeader = coalesced(() => this.view?.renderHeader());
  private readonly drawEntries = coalesced(() => {
    const seqs = [...this.redraw];
    this.redraw.clear();
    this.view?.timeline.update(seqs);
  });

  private arrived(conversationId: string, entries: Entry[]): void {
    if (this.view?.conversationId !== conversationId) return;
    const incoming = entries.filter((e) => e.kind === "text" && e.senderId !== this.store.me);
    const last = incoming.at(-1);
    if (last) announce(this.shell.announcer, `${last.senderId}: ${last.body || "sent a photo"}`);
    this.markRead();
  }

  /** Read marks go out only for what the person can see: the open conversation in a visible tab. */
  markRead(): void {
    const id = this.view?.conversationId;
    if (!id || document.visibilityState !== "visible" || !this.store.historyLoaded(id)) return;
    const newest = this.store.newestSeq(id);
    const conversation = this.store.conversations.get(id);
    if (newest > 0 && (!conversation || newest > conversation.readSeq)) this.sync.markRead(id, newest);
  }

  open(conversationId: string): void {
    if (this.view?.conversationId === conversationId) {
      this.view.composer.focus();
      return;
    }
    const view = new ConversationView(conversationId, this.store, this.actions.messageContext(conversationId), this.actions.forConversation(conversationId));
    this.view = view;
    history.replaceState(null, "", `#${conversationId}`);
    this.shell.pane.replaceChildren(view.element);
    this.shell.layout.classList.add("open");
    this.redraw.clear();
    view.timeline.update(this.store.timeline(conversationId).map((entry) => entry.seq));
    view.timeline.showPending(this.sync.outbox.of(conversationId));
    view.timeline.setHasMore(this.store.hasMore(conversationId));
    view.timeline.scrollToEnd();
    view.renderHeader();
    view.renderTyping();
    this.renderSidebar();
    view.composer.focus();
    if (!this.store.historyLoaded(conversationId)) void this.loadHistory(conversationId, 0);
    void this.loadMembers(conversationId);
    this.markRead();
  }

  close(): void {
    const id = this.view?.conversationId;
    this.view = undefined;
    history.replaceState(null, "", location.pathname);
    this.shell.layout.classList.remove("open");
    this.showEmptyPane();
    this.renderSidebar();
    if (id) requestAnimationFrame(() => this.shell.sidebar.querySelector<HTMLElement>(`[data-conversation-id="${CSS.escape(id)}"]`)?.focus());
  }

  private showEmptyPane(): void {
    this.shell.pane.replaceChildren(h("p", { class: "empty" }, "Pick a conversation, or start one."));
  }

  /** A reload keeps the conversation that was open (its id is the address's #). */
  private openFromAddress(): void {
    const id = decodeURIComponent(location.hash.slice(1));
    if (id && !this.view && this.store.conversations.has(id)) this.open(id);
  }

  /** A page of History: the newest (before 0) or the one before the oldest loaded. */
  async loadHistory(conversationId: string, beforeSeq: number): Promise<void> {
    try {
      const answer = await retried(() => this.api.history({ conversationId, beforeSeq: BigInt(beforeSeq), limit: HISTORY_PAGE }));
      this.store.addEntries(conversationId, answer.messages.map(toEntry), "history");
      // Seq 1 is the conversation's first entry: nothing is older, whatever
      // has_more said of the page (the stream's backlog may reach further back).
      const hasMore = answer.hasMore && this.store.oldestSeq(conversationId) > 1;
      this.store.setHistoryPage(conversationId, hasMore, beforeSeq === 0);
      if (this.view?.conversationId === conversationId) {
        this.view.timeline.setHasMore(this.store.hasMore(conversationId));
        if (beforeSeq === 0) requestAnimationFrame(() => this.view?.timeline.scrollToEnd());
      }
      this.markRead();
    } catch (error) {
      this.error(error);
    }
  }

  /** Members with roles and cursors: the ticks and the header. */
  async loadMembers(conversationId: string): Promise<void> {
    try {
      const answer = await retried(() => this.api.getConversation({ conversationId }));
      if (!answer.conversation) return;
      this.store.putConversation(toConversation(answer.conversation));
      this.store.setMembers(conversationId, toMembers(answer.conversation));
    } catch (error) {
      this.error(error);
    }
  }
}
