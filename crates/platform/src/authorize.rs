//! Which roles may call which internal RPCs, decided from the caller's
//! cluster certificate (a tower layer on every internal server).
//!
//! The TLS handshake already proved the certificate is the cluster CA's; this
//! layer reads the roles it carries ([`crate::tls::roles_of`]) and answers
//! PERMISSION_DENIED to a call no rule grants one of them: a gateway's
//! certificate cannot call `Deliver`, a message instance's cannot register
//! sessions. A caller in the same process ([`crate::local`]) is known by the
//! roles of its own certificate. Health and reflection are open to every
//! cluster member (probes and operators' tools). Without mutual TLS (loopback, or the insecure
//! setting) there is no identity and the layer lets everything through.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::{
    Status,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use crate::{local::LocalCaller, role::Role};

/// `(path prefix, roles that may call it)`.
pub type Rules = Vec<(&'static str, &'static [Role])>;

/// Who may call what: the longest matching path prefix decides.
#[derive(Clone, Debug)]
pub struct Callers {
    rules: Rules,
    domain: String,
}

/// Paths every cluster member may call on any internal port.
const OPEN_TO_MEMBERS: [&str; 3] =
    ["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

impl Callers {
    /// `rules` are `(path prefix, roles)`, e.g.
    /// `("/messenger.v1.PresenceService/Locate", &[Role::Message])`; role
    /// names are `<role>.<domain>`.
    pub fn new(domain: &str, rules: Rules) -> Self {
        Self { rules, domain: domain.to_owned() }
    }

    /// Whether a caller with `roles` may call `path`.
    pub fn allows(&self, path: &str, roles: &[Role]) -> bool {
        if roles.is_empty() {
            return false;
        }
        if OPEN_TO_MEMBERS.iter().any(|prefix| path.starts_with(prefix)) {
            return true;
        }
        self.rules
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .is_some_and(|(_, allowed)| roles.iter().any(|role| allowed.contains(role)))
    }
}

/// The layer; `None` lets every call through (no mutual TLS, no identity).
#[derive(Clone, Debug, Default)]
pub struct AuthorizeLayer {
    callers: Option<Arc<Callers>>,
}

impl AuthorizeLayer {
    pub fn new(callers: Option<Callers>) -> Self {
        Self { callers: callers.map(Arc::new) }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize { inner, callers: self.callers.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    callers: Option<Arc<Callers>>,
}

impl<S, B> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(callers) = &self.callers {
            // A caller in this process names its roles; one on the network
            // has them read from the certificate its handshake verified.
            // Borrowed for an in-process caller: no copy on every call.
            let from_certificate: Vec<Role>;
            let roles: &[Role] = match request.extensions().get::<LocalCaller>() {
                Some(LocalCaller(roles)) => roles,
                None => {
                    from_certificate = request
                        .extensions()
                        .get::<TlsConnectInfo<TcpConnectInfo>>()
                        .and_then(|info| info.peer_certs())
                        .and_then(|certs| certs.first().map(|leaf| crate::tls::roles_of(leaf, &callers.domain)))
                        .unwrap_or_default();
                    &from_certificate
                }
            };
            let path = request.uri().path();
            if !callers.allows(path, roles) {
                tracing::warn!(%path, roles = ?roles, "internal call refused: the caller's certificate has no role that may make it");
                let status = Status::permission_denied(format!(
                    "a cluster certificate with roles {roles:?} may not call {path}"
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        // The clone is ready only if `self.inner` was; keep the ready one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_decides_and_health_is_open_to_members() {
        let callers = Callers::new(
            "messenger.internal",
            vec![
                ("/messenger.v1.PresenceService/", &[Role::Gateway]),
                ("/messenger.v1.PresenceService/Locate", &[Role::Message]),
            ],
        );
        assert!(callers.allows("/messenger.v1.PresenceService/Register", &[Role::Gateway]));
        assert!(!callers.allows("/messenger.v1.PresenceService/Register", &[Role::Message]));
        assert!(callers.allows("/messenger.v1.PresenceService/Locate", &[Role::Message]));
        assert!(!callers.allows("/messenger.v1.PresenceService/Locate", &[Role::Gateway]));
        assert!(callers.allows("/grpc.health.v1.Health/Check", &[Role::Message]));
        assert!(!callers.allows("/grpc.health.v1.Health/Check", &[]), "no certificate, no call");
        assert!(!callers.allows("/messenger.v1.MessageService/Send", &[Role::Gateway]), "no rule, no call");
    }
}
