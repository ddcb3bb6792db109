//! Traces: one per message, across every hop.
//!
//! W3C trace context travels in gRPC metadata (`traceparent`, `tracestate`)
//! on every call: servers take it in `metrics::RpcMetricsLayer` (one
//! span per unary call), clients put it in [`Traced`], the channel every
//! service-to-service call goes through. Long-lived streams (Connect,
//! SendStream) get no span of their own: each frame they carry has a
//! `trace_context` field ([`Carrier`]), and the frame's handler makes a
//! span for it ([`start`]).
//!
//! Every span here has the target [`TARGET`]; `telemetry::init` turns that
//! target off when nothing is exported, so no span is made then.
//! Spans carry ids, names and codes, never a message body or token.

use std::collections::HashMap;

use futures::future::BoxFuture;
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http;
use tracing::{Instrument as _, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The target of every trace span (see the module docs).
pub const TARGET: &str = "messenger::trace";

/// A trace context inside a stream message: W3C `traceparent` (and `tracestate`).
pub type Carrier = HashMap<String, String>;

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: std::sync::OnceLock<TraceContextPropagator> = std::sync::OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// `span`'s context, to send along (empty when the span is not traced).
pub fn inject(span: &Span) -> Carrier {
    let mut carrier = Carrier::new();
    if !span.is_disabled() {
        propagator().inject_context(&span.context(), &mut carrier);
    }
    carrier
}

/// Whether `span` is recorded and exported (sampled).
pub fn sampled(span: &Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// The current span's context, to send along.
pub fn current() -> Carrier {
    inject(&Span::current())
}

/// Makes `span` a child of the remote context in `carrier` (when it holds a
/// valid one; else `span` keeps its local parent or starts a trace), and
/// records its ids for the logs. Returns it.
pub fn start(span: Span, carrier: &impl Extractor) -> Span {
    if span.is_disabled() {
        return span;
    }
    let remote = propagator().extract(carrier);
    if remote.span().span_context().is_valid() {
        let _ = span.set_parent(remote);
    }
    record_ids(&span);
    span
}

/// Records the span's trace and span id as its `trace_id` / `span_id`
/// fields, which JSON log lines inside it carry.
pub fn record_ids(span: &Span) {
    if span.is_disabled() {
        return;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    // Unsampled spans go nowhere: their ids would only cost formatting.
    if span_context.is_sampled() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
        span.record("span_id", tracing::field::display(span_context.span_id()));
    }
}

/// A span for a piece of work inside the current one (`name` as its
/// OpenTelemetry name), with its ids recorded.
pub fn internal(name: &'static str) -> Span {
    let span = tracing::info_span!(target: TARGET, "internal", otel.name = name, trace_id = Empty, span_id = Empty);
    record_ids(&span);
    span
}

/// As [`internal`], inside `parent` instead of the current span (none when
/// `parent` is not traced).
pub fn child(parent: &Span, name: &'static str) -> Span {
    if parent.is_disabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: parent,
        "internal",
        otel.name = name,
        trace_id = Empty,
        span_id = Empty,
    );
    record_ids(&span);
    span
}

/// As [`internal`], a child of the remote context in `carrier`.
pub fn remote(name: &'static str, carrier: &Carrier) -> Span {
    let span = tracing::info_span!(target: TARGET, "internal", otel.name = name, trace_id = Empty, span_id = Empty);
    start(span, carrier)
}

/// Reads trace context from gRPC metadata (HTTP/2 headers).
pub struct Headers<'a>(pub &'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// Whether a server answering `code` failed (OpenTelemetry's gRPC
/// conventions): the caller's mistakes (NOT_FOUND, INVALID_ARGUMENT, ...)
/// are not the server's errors.
pub fn server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss)
}

/// The span of one call a server answers (a unary call: streams trace per frame).
pub fn server_span(name: &str, service: &str, method: &str, headers: &http::HeaderMap) -> Span {
    start(rpc_span("server", name, service, method), &Headers(headers))
}

/// The span of one frame a stream carries (`name`: `Service/Method Frame`),
/// child of the context the frame carries.
pub fn frame_span(name: &'static str, service: &'static str, method: &'static str, carrier: &Carrier) -> Span {
    start(rpc_span("server", name, service, method), carrier)
}

/// An RPC span as OpenTelemetry's conventions name it; `kind`: server or client.
fn rpc_span(kind: &'static str, name: &str, service: &str, method: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "rpc",
        otel.name = name,
        otel.kind = kind,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        trace_id = Empty,
        span_id = Empty,
    )
}

/// Records a finished call's code on its span.
pub fn finish(span: &Span, code: tonic::Code, server: bool) {
    if span.is_disabled() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    let failed = if server { server_error(code) } else { code != tonic::Code::Ok };
    if failed {
        span.record("otel.status_code", "ERROR");
    }
}

/// The code in a response's `grpc-status` header or trailer.
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(value))
}

/// A client channel that traces each call: a client span (child of the
/// caller's current span) whose context goes out in the call's metadata.
#[derive(Clone, Debug)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The readied service takes the call at once: no clone needed.
        let span = client_span(request.uri().path());
        if span.is_disabled() {
            return Box::pin(self.inner.call(request));
        }
        propagator().inject_context(&span.context(), &mut HeadersMut(request.headers_mut()));
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let response = future.await;
                // Trailers-only answers (errors) carry their code here; a
                // transport error is the call's failure.
                let code = match &response {
                    Ok(response) => grpc_status(response.headers()).unwrap_or(tonic::Code::Ok),
                    Err(_) => tonic::Code::Unavailable,
                };
                finish(&Span::current(), code, false);
                response
            }
            .instrument(span),
        )
    }
}

fn client_span(path: &str) -> Span {
    let (service, method) = path.strip_prefix('/').and_then(|path| path.split_once('/')).unwrap_or(("unknown", path));
    let span = rpc_span("client", path.trim_start_matches('/'), service, method);
    record_ids(&span);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_context_is_the_parent_and_a_malformed_one_is_ignored() {
        let carrier: Carrier =
            [("traceparent".to_owned(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned())].into();
        let extracted = propagator().extract(&carrier);
        assert_eq!(extracted.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let broken: Carrier = [("traceparent".to_owned(), "00-zz-00f067aa0ba902b7-01".to_owned())].into();
        assert!(!propagator().extract(&broken).span().span_context().is_valid());
        // No subscriber exports here: spans are disabled and nothing is injected.
        assert!(inject(&start(tracing::info_span!(target: TARGET, "x"), &carrier)).is_empty());
    }
}
