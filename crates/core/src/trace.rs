//! Trace context across processes: W3C `traceparent` in stream entries
//! (`nexus.pipeline.v1.TraceContext`) and gRPC metadata, so one session is one
//! trace through ingest, encoder and decoder. Without an OTLP endpoint spans
//! carry no context and these helpers do nothing.

use std::collections::HashMap;

use nexus_proto::pipeline::TraceContext;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The context of `span` to put into an outgoing entry; `None` when traces are off.
pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    let traceparent = carrier.remove(TRACEPARENT)?;
    Some(TraceContext {
        traceparent,
        tracestate: carrier.remove(TRACESTATE).unwrap_or_default(),
    })
}

/// Makes `span` a child of the span that wrote an entry carrying `ctx`.
pub fn follow(span: &tracing::Span, ctx: Option<&TraceContext>) {
    let Some(ctx) = ctx.filter(|c| !c.traceparent.is_empty()) else {
        return;
    };
    let carrier = HashMap::from([
        (TRACEPARENT.to_owned(), ctx.traceparent.clone()),
        (TRACESTATE.to_owned(), ctx.tracestate.clone()),
    ]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// Makes `span` a child of the caller's span when the gRPC call carries a
/// `traceparent` header.
pub fn follow_metadata(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let get = |k: &str| {
        metadata
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    follow(
        span,
        Some(&TraceContext {
            traceparent: get(TRACEPARENT),
            tracestate: get(TRACESTATE),
        }),
    );
}
