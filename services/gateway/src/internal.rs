//! `GatewayInternalService::Deliver`: the message service hands committed
//! messages to the sessions this gateway holds.

use std::sync::Arc;

use messenger_platform::trace;
use messenger_proto::v1::{self as pb, gateway_internal_service_server::GatewayInternalService};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::registry::{Delivered, Registry};

pub(crate) struct Adapter {
    pub registry: Registry,
}

#[tonic::async_trait]
impl GatewayInternalService for Adapter {
    async fn deliver(&self, request: Request<pb::DeliverRequest>) -> Result<Response<pb::DeliverResponse>, Status> {
        let mut missing = 0u32;
        let mut overflowed = 0u32;
        for delivery in request.into_inner().deliveries {
            let Some(event) = delivery.event else {
                continue;
            };
            let event = Arc::new(event);
            // The event's own trace (a batch carries many): its span lasts
            // until every session here has written the frame.
            let span = if delivery.trace_context.is_empty() {
                tracing::Span::none()
            } else {
                trace::remote("deliver to sessions", &delivery.trace_context)
            };
            for session_id in &delivery.session_ids {
                match self.registry.deliver(session_id, &event, &span) {
                    Delivered::Queued => {}
                    Delivered::Overflowed => overflowed += 1,
                    Delivered::Missing => missing += 1,
                }
            }
        }
        if overflowed > 0 {
            debug!(overflowed, "session inboxes full; those sessions re-sync");
        }
        Ok(Response::new(pb::DeliverResponse { missing_sessions: missing }))
    }
}
