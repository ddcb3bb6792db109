//! A real OTLP/gRPC trace receiver on loopback: the collector's own service
//! (`opentelemetry-proto`'s generated server). It counts every span it is
//! sent, and keeps them when asked (the trace tests read them; the bench
//! only counts).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
};
use tokio_util::sync::CancellationToken;

/// One received span, with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    /// OTLP span kind: 1 internal, 2 server, 3 client.
    pub kind: i32,
    pub attributes: Vec<(String, String)>,
}

impl Received {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Collector {
    keep: bool,
    count: Arc<AtomicU64>,
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|value| value.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn pairs(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let count = request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len() as u64).sum();
        self.count.fetch_add(count, Ordering::Relaxed);
        if !self.keep {
            return Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }));
        }
        let mut kept = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for resource in request.resource_spans {
            let resource_attributes = resource.resource.map(|r| pairs(&r.attributes)).unwrap_or_default();
            let service = resource_attributes
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                kept.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes: pairs(&span.attributes),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The receiver; stops when dropped.
pub struct Receiver {
    collector: Collector,
    stop: CancellationToken,
    address: SocketAddr,
}

impl Receiver {
    /// Serves on `address` (a port chosen before the exporters were pointed
    /// at it, or port 0); `keep`: keep every span for [`Receiver::trace`].
    pub async fn start(address: SocketAddr, keep: bool) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let collector = Collector { keep, ..Collector::default() };
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        Ok(Self { collector, stop, address })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Spans received so far.
    pub fn count(&self) -> u64 {
        self.collector.count.load(Ordering::Relaxed)
    }

    /// Every span received so far in `trace_id`.
    pub fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.collector
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
