//! What comes in on the stream (messages, answers to sends, receipts,
//! typing, presence) applied to the model and handed to the app; the
//! conversation snapshots a reconnect reads; the acks and read marks that go out.

use messenger_proto::v1::{self as pb, ClientFrame, client_frame::Frame as OutFrame, server_frame::Frame as InFrame};
use tonic::Code;

use super::{End, Task, lost};
use crate::{Error, Event};

impl Task {
    pub(super) async fn handle(&mut self, frame: pb::ServerFrame) -> Option<End> {
        match frame.frame? {
            InFrame::Message(message) => {
                let highest = self.highest.entry(message.conversation_id.clone()).or_insert(0);
                if message.seq <= *highest {
                    return None;
                }
                *highest = message.seq;
                let is_new = self.model.lock().unwrap_or_else(|e| e.into_inner()).apply(&message);
                if is_new {
                    self.refresh(vec![message.conversation_id.clone()]);
                }
                let (conversation, seq) = (message.conversation_id.clone(), message.seq);
                // Waiting here when the app lags is deliberate: it stops reading the stream.
                if self.events.send(Event::Message(message)).await.is_err() {
                    return Some(End::Closed);
                }
                let ack = self.acks.entry(conversation).or_insert(0);
                *ack = (*ack).max(seq);
            }
            InFrame::SendAck(ack) => self.sends.answer(&ack.client_msg_id.clone(), Ok(ack)),
            InFrame::Error(error) => {
                let code = Code::from_i32(error.code);
                let retriable = matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Aborted);
                if !error.client_msg_id.is_empty() && retriable {
                    // The server could not finish it for now: it stays
                    // pending and goes again with the same id, alone.
                    self.sends.retry_later(&error.client_msg_id, error.retry_after_ms);
                } else if !error.client_msg_id.is_empty() {
                    self.sends.answer(&error.client_msg_id, Err(Error::Rejected { code, message: error.message }));
                } else if code == Code::Unavailable && error.conversation_id.is_empty() {
                    // The gateway itself going away ("shutting down; reconnect").
                    // A read mark or typing hint the server could not take names its
                    // conversation: reported below, the stream stays.
                    return Some(lost(&error.message));
                } else {
                    let _ = self.events.send(Event::ServerError { code, message: error.message }).await;
                }
            }
            InFrame::Receipt(receipt) => {
                self.model.lock().unwrap_or_else(|e| e.into_inner()).apply_receipt(&receipt);
                let _ = self.events.send(Event::Receipt(receipt)).await;
            }
            InFrame::Typing(typing) => {
                self.model.lock().unwrap_or_else(|e| e.into_inner()).apply_typing(&typing);
                let _ = self.events.send(Event::Typing(typing)).await;
            }
            InFrame::Presence(update) => {
                self.model.lock().unwrap_or_else(|e| e.into_inner()).apply_presence(&update);
                let _ = self.events.send(Event::Presence(update)).await;
            }
            InFrame::Pong(_) | InFrame::Ready(_) => {}
        }
        None
    }

    /// Fetches members, title and cursors of conversations in the
    /// background: one `GetConversations` per `REFRESH_BATCH` of them (one
    /// `GetConversation` each from a server that refuses the batch).
    pub(super) fn refresh(&self, conversation_ids: Vec<String>) {
        if conversation_ids.is_empty() {
            return;
        }
        let (mut api, model) = (self.api.current(), self.model.clone());
        tokio::spawn(async move {
            for batch in conversation_ids.chunks(REFRESH_BATCH) {
                let request = pb::GetConversationsRequest { conversation_ids: batch.to_vec() };
                let conversations = match api.get_conversations(request).await {
                    Ok(response) => response.into_inner().conversations,
                    // Over the query rate: these are refreshed at the next reconnect or change.
                    Err(status) if status.code() == Code::ResourceExhausted => continue,
                    // An older server, one that takes fewer ids a call, or one
                    // conversation that could not be read: one at a time.
                    Err(_) => {
                        let mut one_by_one = Vec::new();
                        for conversation_id in batch {
                            let request = pb::GetConversationRequest { conversation_id: conversation_id.clone() };
                            if let Ok(response) = api.get_conversation(request).await {
                                one_by_one.extend(response.into_inner().conversation);
                            }
                        }
                        one_by_one
                    }
                };
                let mut model = model.lock().unwrap_or_else(|e| e.into_inner());
                for conversation in &conversations {
                    model.refresh(conversation);
                }
            }
        });
    }

    /// Queues read marks and acks (coalesced per conversation) for sending.
    pub(super) fn flush_acks(&mut self) {
        for (conversation_id, seq) in self.reads.drain() {
            self.backlog.push_back(ClientFrame {
                trace_context: Default::default(),
                frame: Some(OutFrame::Read(pb::Read { conversation_id, seq })),
            });
        }
        for (conversation_id, seq) in self.acks.drain() {
            self.backlog.push_back(ClientFrame {
                trace_context: Default::default(),
                frame: Some(OutFrame::Ack(pb::Ack { conversation_id, seq })),
            });
        }
    }
}

/// Conversations per `GetConversations` call when refreshing after a
/// reconnect: the server's default `message.conversations_per_call`.
const REFRESH_BATCH: usize = 100;
