//! The `envoy.service.discovery.v3.AggregatedDiscoveryService` gRPC service.

use std::{pin::Pin, sync::Arc};

use cairn_api::proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::{
    cache::Cache,
    stream::{Audience, StreamState},
};
use crate::auth::{self, Authenticator};

/// Responses buffered per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 8;

pub struct AdsService {
    cache: Arc<Cache>,
    auth: Arc<dyn Authenticator>,
    shutdown: watch::Receiver<bool>,
}

impl AdsService {
    /// `shutdown` turning true ends every stream, so clients reconnect elsewhere
    /// instead of holding a stream to a controller that no longer updates it.
    pub fn new(
        cache: Arc<Cache>,
        auth: Arc<dyn Authenticator>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cache,
            auth,
            shutdown,
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "Cairn serves only the delta protocol: use DeltaAggregatedResources",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let caller = auth::authenticate(self.auth.as_ref(), req.metadata())
            .await
            .inspect_err(|e| warn!(peer = %peer, error = %e, "refused xDS stream"))?;
        let client = format!("{caller}@{peer}");
        // A waypoint proves its ServiceAccount's identity, named like its Gateway.
        let audience = match &caller {
            auth::Caller::Node(_) => Audience::All,
            auth::Caller::Identity(id) => {
                Audience::Waypoint(format!("{}/{}", id.namespace(), id.service_account()))
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let cache = self.cache.clone();
        let requests = req.into_inner();
        let span = info_span!("xds", client = %client);
        tokio::spawn(
            serve_stream(cache, client, audience, requests, tx, self.shutdown.clone())
                .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve_stream(
    cache: Arc<Cache>,
    client: String,
    audience: Audience,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let sub = cache.subscribe();
    let mut state = StreamState::for_audience(client, audience);
    info!("xDS stream opened");
    metrics::gauge!("cairn_xds_streams").increment(1.0);
    let reason = loop {
        if *shutdown.borrow() {
            break "controller shutting down";
        }
        tokio::select! {
            _ = shutdown.changed() => break "controller shutting down",
            msg = requests.message() => match msg {
                Ok(Some(req)) => {
                    let handled = state.handle(&cache, req);
                    if let Some(resp) = handled.response
                        && tx.send(Ok(resp)).await.is_err()
                    {
                        break "client went away";
                    }
                }
                Ok(None) => break "client closed the stream",
                Err(e) => {
                    warn!(error = %e, "xDS stream error");
                    break "stream error";
                }
            },
            () = sub.notify.notified() => {
                for resp in state.on_pending(&cache, sub.take()) {
                    if tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
                if tx.is_closed() {
                    break "client went away";
                }
            }
        }
    };
    cache.unsubscribe(sub.id);
    metrics::gauge!("cairn_xds_streams").decrement(1.0);
    info!(reason, "xDS stream closed");
}
