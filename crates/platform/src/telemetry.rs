//! Logging and trace export setup. Logs are structured and never contain
//! message bodies or tokens; traces are OpenTelemetry, exported over
//! OTLP/gRPC (`trace.rs` makes the spans and carries their context).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter},
};
use serde::{Deserialize, Serialize};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::trace::TARGET;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors. A line logged inside a
    /// traced span carries its `trace_id` and `span_id` (in `span`).
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogOptions {
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info,messenger_gateway=debug`.
    /// `RUST_LOG` overrides it when set.
    pub filter: String,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, filter: "info".to_owned() }
    }
}

/// Trace (and OTLP metric) export.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingOptions {
    /// The OTLP/gRPC collector, e.g. `http://otel-collector:4317` (plain:
    /// OTLP over TLS is not built); empty:
    /// no spans are made and nothing is exported (metrics stay on `/metrics`).
    pub otlp_endpoint: String,
    /// Fraction of new traces kept (0.0 ..= 1.0). Parent based: a call from a
    /// sampled caller is always kept, one from an unsampled caller never.
    pub sample_ratio: f64,
    /// Finished spans waiting for export; when full, new spans are dropped
    /// (counted in `messenger.telemetry.spans{outcome="dropped"}`), never waited for.
    pub max_queue: usize,
    /// Spans per export request.
    pub max_batch: usize,
    /// How often queued spans are exported.
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
    /// One export request's deadline (the collector is down or slow: the
    /// batch is dropped, requests are not slowed), and the flush's at exit.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// How often metrics are pushed to the same collector too; 0 s: only
    /// the Prometheus `/metrics` endpoint.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
}

impl Default for TracingOptions {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 0.01,
            max_queue: 4096,
            max_batch: 512,
            export_interval: Duration::from_secs(2),
            export_timeout: Duration::from_secs(5),
            metrics_interval: Duration::from_secs(30),
        }
    }
}

impl TracingOptions {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err("tracing.sample_ratio must be between 0.0 and 1.0".into());
        }
        if self.max_queue == 0 || self.max_batch == 0 || self.max_batch > self.max_queue {
            return Err("tracing.max_batch must be positive and at most tracing.max_queue".into());
        }
        if self.export_interval.is_zero() || self.export_timeout.is_zero() {
            return Err("tracing.export_interval and tracing.export_timeout must be positive".into());
        }
        // The exporter is built without TLS: a collector agent beside the
        // process (a sidecar or node agent) takes plain OTLP.
        if self.enabled() && !self.otlp_endpoint.starts_with("http://") {
            return Err("tracing.otlp_endpoint must be an http:// URL (OTLP over TLS is not built)".into());
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes what is queued.
#[must_use = "shut it down at exit, or queued spans are lost"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    timeout: Duration,
}

impl Telemetry {
    /// Exports what is queued and stops the exporters: traces and metrics at
    /// once, each within `export_timeout`. It blocks: call it from a
    /// blocking thread (`spawn_blocking`), the exporters need the runtime.
    pub fn shutdown(self) {
        let timeout = self.timeout;
        std::thread::scope(|scope| {
            scope.spawn(|| crate::metrics::shutdown(timeout));
            if let Some(provider) = &self.tracer
                && let Err(error) = provider.shutdown_with_timeout(timeout)
            {
                tracing::warn!(%error, "trace export did not flush at shutdown");
            }
        });
    }
}

/// Installs the global subscriber (and, with an OTLP endpoint, trace and
/// metric export, service name `service`). Later calls install nothing.
/// Call it inside the Tokio runtime: the OTLP client runs on it.
pub fn init(log: &LogOptions, tracing: &TracingOptions, service: &str) -> Telemetry {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let resource = Resource::builder().with_service_name(service.to_owned()).build();
    // Before any metric is made: the meter provider reads it once.
    if tracing.enabled() && !tracing.metrics_interval.is_zero() {
        crate::metrics::export_otlp(
            &tracing.otlp_endpoint,
            tracing.metrics_interval,
            tracing.export_timeout,
            resource.clone(),
        );
    }
    let provider = tracing
        .enabled()
        .then(|| tracer_provider(tracing, resource.clone()))
        .and_then(|built| built.map_err(|error| eprintln!("trace export is off: {error}")).ok());
    // Trace spans are made only when they go somewhere: with no exporter
    // they are disabled at their call site and none is made.
    let spans = if provider.is_some() { "info" } else { "off" };
    if let Ok(directive) = format!("{TARGET}={spans}").parse() {
        filter = filter.add_directive(directive);
    }
    // Only the trace spans become OpenTelemetry spans (not, with a debug log
    // filter, every span a dependency makes).
    let otel = provider.as_ref().map(|provider| {
        let only_trace_spans = tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("messenger"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            // Busy / idle time per span costs two clock reads on every poll
            // of an instrumented future, and nothing here reads it.
            .with_tracked_inactivity(false)
            .with_filter(only_trace_spans)
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let installed = match log.format {
        LogFormat::Pretty => registry.with(fmt::layer().with_writer(std::io::stderr)).try_init(),
        LogFormat::Json => registry.with(json_logs(std::io::stderr)).try_init(),
    };
    let timeout = tracing.export_timeout;
    if installed.is_err() {
        return Telemetry { tracer: None, timeout };
    }
    Telemetry { tracer: provider, timeout }
}

/// JSON lines; inside a traced span each carries the span's fields, its
/// `trace_id` and `span_id` among them (`trace::record_ids`).
fn json_logs<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    fmt::layer().json().with_current_span(true).with_span_list(false).with_writer(writer)
}

fn tracer_provider(options: &TracingOptions, resource: Resource) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(options.otlp_endpoint.clone())
        .with_timeout(options.export_timeout)
        .build()
        .map_err(|error| error.to_string())?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(options.max_queue)
        .with_max_export_batch_size(options.max_batch)
        .with_scheduled_delay(options.export_interval)
        .build();
    let processor = BatchSpanProcessor::builder(Counted(exporter)).with_batch_config(batch).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(Counting(processor))
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(options.sample_ratio))))
        .with_resource(resource)
        .build())
}

/// `messenger.telemetry.spans` by outcome: `ended` (sampled spans handed to
/// the export queue), `exported`, `failed` (the collector refused or did not
/// answer). What ended and is neither was dropped from a full queue.
fn span_counter() -> &'static crate::metrics::Counter<u64> {
    static COUNTER: std::sync::OnceLock<crate::metrics::Counter<u64>> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| {
        crate::metrics::meter()
            .u64_counter("messenger.telemetry.spans")
            .with_description(
                "Sampled spans by outcome: ended, exported, failed (ended - exported - failed = dropped or queued)",
            )
            .build()
    })
}

fn count_spans(outcome: &'static str, spans: usize) {
    span_counter().add(spans as u64, &[crate::metrics::KeyValue::new("outcome", outcome)]);
}

/// The batch processor, counting every sampled span as it ends (the queue
/// drops silently when full).
#[derive(Debug)]
struct Counting(BatchSpanProcessor);

impl opentelemetry_sdk::trace::SpanProcessor for Counting {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        count_spans("ended", 1);
        self.0.on_end(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// The exporter, counting what it sent and what failed.
#[derive(Debug)]
struct Counted<E>(E);

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        let result = self.0.export(batch).await;
        count_spans(if result.is_ok() { "exported" } else { "failed" }, spans);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_log_line_inside_a_traced_span_carries_its_trace_and_span_id() {
        let provider = SdkTracerProvider::builder().build();
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(json_logs(move || writer.clone()));
        let mut headers = tonic::codegen::http::HeaderMap::new();
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let span_id = tracing::subscriber::with_default(subscriber, || {
            let span = crate::trace::server_span("pkg.Service/Call", "pkg.Service", "Call", &headers);
            let _entered = span.enter();
            tracing::info!("inside");
            span.context().span().span_context().span_id().to_string()
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().expect("one line")).unwrap();
        assert_eq!(line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{text}");
        assert_eq!(line["span"]["span_id"], span_id.as_str(), "{text}");
        assert_ne!(span_id, "00f067aa0ba902b7", "the span is the remote parent's child, not the parent");
    }
}
