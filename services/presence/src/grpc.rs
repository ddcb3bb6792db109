//! The tonic adapter: converts requests and errors, holds no logic.

use std::sync::Arc;

use messenger_proto::v1::{self as pb, presence_service_server::PresenceService};
use tonic::{Request, Response, Status};

use crate::{
    Options,
    store::{Error, Mode, PresenceStore, Session, SessionRef, ttl_ms},
};

pub struct Adapter {
    pub options: Options,
    pub store: Arc<dyn PresenceStore>,
}

impl messenger_platform::error::ServiceError for Error {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::TooManySessions { .. } => Code::ResourceExhausted,
            Error::Superseded { .. } => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::InvalidConfig(_) => Code::Internal,
        }
    }

    /// Redis text stays in this service's log: a gateway passes a failed
    /// registration on to the device.
    fn internal(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::InvalidConfig(_))
    }
}

messenger_platform::status_from!(Error);

impl Adapter {
    fn check_batch(&self, what: &str, count: usize) -> Result<(), Status> {
        if count > self.options.max_users_per_call {
            return Err(Status::invalid_argument(format!(
                "{count} {what} in one call; the limit is {}",
                self.options.max_users_per_call
            )));
        }
        Ok(())
    }
}

fn session_to_proto(session: Session) -> pb::Session {
    pb::Session {
        user_id: session.user_id,
        device_id: session.device_id,
        session_id: session.session_id,
        gateway_id: session.gateway_id,
        gateway_addr: session.gateway_addr,
        connected_at_ms: session.connected_at_ms,
    }
}

#[tonic::async_trait]
impl PresenceService for Adapter {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let request = request.into_inner();
        let session = request.session.ok_or_else(|| Status::invalid_argument("session is required"))?;
        if session.user_id.is_empty() || session.session_id.is_empty() || session.gateway_addr.is_empty() {
            return Err(Status::invalid_argument("session needs user_id, session_id and gateway_addr"));
        }
        let session = Session {
            user_id: session.user_id,
            device_id: session.device_id,
            session_id: session.session_id,
            gateway_id: session.gateway_id,
            gateway_addr: session.gateway_addr,
            connected_at_ms: session.connected_at_ms,
        };
        let mode = if request.restore { Mode::Restore } else { Mode::Connect };
        // Decided by the store atomically with the write: a racing
        // unregistration sees this session or does not, never half of it.
        let transition = self.store.register(session, self.options.max_sessions_per_user, mode).await?;
        let came_online = transition.changed && mode == Mode::Connect;
        Ok(Response::new(pb::RegisterResponse {
            came_online,
            online_at_ms: if came_online { transition.at_ms } else { 0 },
        }))
    }

    async fn unregister(
        &self,
        request: Request<pb::UnregisterRequest>,
    ) -> Result<Response<pb::UnregisterResponse>, Status> {
        let request = request.into_inner();
        let transition = self.store.unregister(&request.user_id, &request.session_id).await?;
        Ok(Response::new(match transition.changed {
            true => pb::UnregisterResponse { went_offline: true, last_seen_ms: transition.at_ms },
            false => pb::UnregisterResponse::default(),
        }))
    }

    async fn locate(&self, request: Request<pb::LocateRequest>) -> Result<Response<pb::LocateResponse>, Status> {
        let users = request.into_inner().user_ids;
        self.check_batch("users", users.len())?;
        let sessions = self.store.locate(&users).await?;
        Ok(Response::new(pb::LocateResponse { sessions: sessions.into_iter().map(session_to_proto).collect() }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let users = request.into_inner().user_ids;
        self.check_batch("users", users.len())?;
        let statuses = self.store.status(&users).await?;
        Ok(Response::new(pb::StatusResponse {
            statuses: statuses
                .into_iter()
                .map(|s| pb::UserStatus { user_id: s.user_id, online: s.online, last_seen_ms: s.last_seen_ms })
                .collect(),
        }))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let request = request.into_inner();
        if request.gateway_id.is_empty() {
            return Err(Status::invalid_argument("gateway_id is required"));
        }
        self.check_batch("sessions", request.sessions.len())?;
        let sessions: Vec<SessionRef> =
            request.sessions.into_iter().map(|s| SessionRef { user_id: s.user_id, session_id: s.session_id }).collect();
        let unknown_session_ids = self.store.renew(&request.gateway_id, &sessions).await?;
        Ok(Response::new(pb::RenewResponse { unknown_session_ids, session_ttl_ms: ttl_ms(self.store.session_ttl()) }))
    }
}
