//! Metrics: OpenTelemetry instruments, read by a Prometheus exporter whose
//! registry the admin port serves at `/metrics` (`admin.rs`).
//!
//! RED for every RPC comes from [`RpcMetricsLayer`], which `server::serve`
//! puts in front of every server, so no handler records anything itself:
//! one histogram, `rpc.server.duration` (seconds), whose count is the rate
//! and whose `rpc.grpc.status_code` label gives the errors by code. For a
//! streaming RPC the duration is the stream's lifetime and the code is the
//! one its trailers carry (`CANCELLED` when the client went away first).
//!
//! Labels are bounded: a method path that no served service declares is
//! recorded as `unknown`, so a client cannot grow the series without limit.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tonic::{Code, codegen::http};
use tower::{Layer, Service};
use tracing::Instrument as _;

/// Duration buckets (seconds): unary calls sit in the first half, streams
/// (held for minutes) in the last buckets.
const DURATION_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0];

pub use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram, Meter, UpDownCounter},
};

/// The process's instruments and the registry `/metrics` renders.
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    rpc_duration: Histogram<f64>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, created on first use.
pub fn global() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let registry = prometheus::Registry::new();
        // Fails only when the registry already holds its collector: it is new here.
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .expect("a fresh registry takes the exporter");
        let mut provider = SdkMeterProvider::builder().with_reader(exporter);
        if let Some(otlp) = OTLP.get() {
            provider = provider.with_resource(otlp.resource.clone());
            match opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(otlp.endpoint.clone())
                .with_timeout(otlp.timeout)
                .build()
            {
                Ok(exporter) => {
                    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                        .with_interval(otlp.interval)
                        .build();
                    provider = provider.with_reader(reader);
                }
                Err(error) => tracing::warn!(%error, "OTLP metric export is off"),
            }
        }
        let provider = provider.build();
        let meter = provider.meter("messenger");
        let rpc_duration = meter
            .f64_histogram("rpc.server.duration")
            .with_unit("s")
            .with_description("Duration of RPCs served, by service, method and gRPC status code")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        Metrics { registry, provider, meter, rpc_duration }
    })
}

/// Where metrics are pushed besides `/metrics` ([`export_otlp`]).
struct Otlp {
    endpoint: String,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    resource: opentelemetry_sdk::Resource,
}

static OTLP: OnceLock<Otlp> = OnceLock::new();

/// Pushes every metric to an OTLP/gRPC collector each `interval` too. Takes
/// effect only before the first metric is made (`telemetry::init` calls it first).
pub fn export_otlp(
    endpoint: &str,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    resource: opentelemetry_sdk::Resource,
) {
    let set = OTLP.set(Otlp { endpoint: endpoint.to_owned(), interval, timeout, resource }).is_ok();
    if !set || METRICS.get().is_some() {
        tracing::warn!("OTLP metric export configured after metrics were in use: only /metrics serves them");
    }
}

/// Pushes what the OTLP reader holds and stops it (at exit), within `timeout`.
pub fn shutdown(timeout: std::time::Duration) {
    if OTLP.get().is_some()
        && let Some(metrics) = METRICS.get()
        && let Err(error) = metrics.provider.shutdown_with_timeout(timeout)
    {
        tracing::warn!(%error, "metric export did not flush at shutdown");
    }
}

/// The meter services create their own instruments from (once each, in a
/// `OnceLock`), so every metric lands in the one registry `/metrics` serves.
pub fn meter() -> &'static Meter {
    &global().meter
}

impl Metrics {
    /// Everything recorded so far, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut buffer = Vec::new();
        if let Err(error) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Records every call's duration and status code (see the module docs),
/// and traces each unary call (`trace.rs`): a server span, child of the
/// context the caller sent.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    /// Each known path's labels, made once: a call only clones them.
    methods: Arc<HashMap<String, Method>>,
    unknown: Method,
}

/// A call's labels before its status code is known.
type Labels = [KeyValue; 4];

/// What a served method is recorded as.
#[derive(Clone)]
struct Method {
    labels: Labels,
    /// `package.Service/Method`, the span name.
    name: Arc<str>,
    service: Arc<str>,
    method: Arc<str>,
    /// Whether each call gets a server span (streams are traced per frame
    /// by their handlers, health checks not at all).
    traced: bool,
}

impl RpcMetricsLayer {
    /// `server` names the port (a label); `methods` are the paths
    /// (`/package.Service/Method`) recorded by name, each with whether its
    /// calls get a server span.
    pub fn new(server: &'static str, methods: HashMap<String, bool>) -> Self {
        let method = |service: &str, name: &str, traced: bool| {
            // Shared strings: cloning the labels per call allocates nothing.
            let (service, method): (Arc<str>, Arc<str>) = (service.into(), name.into());
            Method {
                labels: [
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", opentelemetry::StringValue::from(service.clone())),
                    KeyValue::new("rpc.method", opentelemetry::StringValue::from(method.clone())),
                    KeyValue::new("messenger.server", server),
                ],
                name: format!("{service}/{method}").into(),
                service,
                method,
                traced,
            }
        };
        let methods = methods
            .into_iter()
            .filter_map(|(path, traced)| {
                let (service, name) = path.strip_prefix('/')?.split_once('/')?;
                let method = method(service, name, traced);
                Some((path, method))
            })
            .collect();
        Self { methods: Arc::new(methods), unknown: method("unknown", "unknown", false) }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
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
        let call = Call::start(&self.layer, request.uri().path(), request.headers());
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let span = call.span.clone();
        Box::pin(
            async move {
                let response = inner.call(request).await?;
                // Trailers-only: an error answered before any message.
                if let Some(code) = crate::trace::grpc_status(response.headers()) {
                    call.finish(code);
                    return Ok(response);
                }
                let (parts, body) = response.into_parts();
                let body = tonic::body::Body::new(MeteredBody { inner: body, call: Some(call) });
                Ok(http::Response::from_parts(parts, body))
            }
            .instrument(span),
        )
    }
}

/// One call being measured.
struct Call {
    started: Instant,
    labels: Labels,
    /// Disabled for streams and when nothing is traced.
    span: tracing::Span,
}

impl Call {
    fn start(layer: &RpcMetricsLayer, path: &str, headers: &http::HeaderMap) -> Call {
        let method = layer.methods.get(path).unwrap_or(&layer.unknown);
        let span = if method.traced {
            crate::trace::server_span(&method.name, &method.service, &method.method, headers)
        } else {
            tracing::Span::none()
        };
        Call { started: Instant::now(), labels: method.labels.clone(), span }
    }

    fn finish(self, code: Code) {
        crate::trace::finish(&self.span, code, true);
        let [system, service, method, server] = self.labels;
        let attributes = [system, service, method, server, KeyValue::new("rpc.grpc.status_code", code as i64)];
        global().rpc_duration.record(self.started.elapsed().as_secs_f64(), &attributes);
    }
}

/// A response body that finishes its call's measurement at the trailers.
struct MeteredBody {
    inner: tonic::body::Body,
    call: Option<Call>,
}

impl MeteredBody {
    fn finish(&mut self, code: Code) {
        if let Some(call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = crate::trace::grpc_status(trailers).unwrap_or(Code::Unknown);
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.finish(status.code()),
            // A gRPC body always ends with trailers; one without says nothing good.
            Poll::Ready(None) => self.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    /// Dropped before its trailers: the client went away (or the drain ended it).
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_label_and_codes_are_recorded() {
        let layer = RpcMetricsLayer::new("test", [("/pkg.Known/Call".to_owned(), true)].into());
        let headers = http::HeaderMap::new();
        Call::start(&layer, "/pkg.Known/Call", &headers).finish(Code::NotFound);
        Call::start(&layer, "/pkg.Made/Up1", &headers).finish(Code::Unimplemented);
        Call::start(&layer, "/pkg.Made/Up2", &headers).finish(Code::Unimplemented);
        let text = global().render();
        let series = |needle: &[&str]| {
            text.lines()
                .filter(|line| line.starts_with("rpc_server_duration_seconds_count{"))
                .filter(|line| line.contains("messenger_server=\"test\""))
                .find(|line| needle.iter().all(|part| line.contains(part)))
                .map(|line| line.rsplit(' ').next().unwrap().to_owned())
        };
        let known = series(&["rpc_method=\"Call\"", "rpc_service=\"pkg.Known\"", "rpc_grpc_status_code=\"5\""]);
        assert_eq!(known.as_deref(), Some("1"), "{text}");
        let unknown = series(&["rpc_method=\"unknown\"", "rpc_grpc_status_code=\"12\""]);
        assert_eq!(unknown.as_deref(), Some("2"), "{text}");
        assert!(!text.contains("Up1"), "a made-up method became a label: {text}");
    }
}
