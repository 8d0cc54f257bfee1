//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.

use std::{sync::Arc, time::Duration};

use cairn_api::proto::ca::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::IstioCertificateService,
};
use cairn_identity::SpiffeId;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{CaError, CertificateAuthority};
use crate::auth::{self, Authenticator, Caller};

/// Istio's metadata key for the identity a node proxy requests for a workload.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Answers "does a workload with this identity run on this node?".
pub trait WorkloadDirectory: Send + Sync + 'static {
    fn node_runs(&self, node: &str, id: &SpiffeId) -> bool;
}

pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    workloads: Arc<dyn WorkloadDirectory>,
    default_ttl: Duration,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        workloads: Arc<dyn WorkloadDirectory>,
        default_ttl: Duration,
    ) -> Self {
        Self {
            ca,
            auth,
            workloads,
            default_ttl,
        }
    }
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Self {
        match e {
            CaError::BadCsr(_)
            | CaError::CsrSans(_)
            | CaError::CsrIdentity(_)
            | CaError::TrustDomain { .. } => Status::invalid_argument(e.to_string()),
            CaError::Io { .. } | CaError::Material { .. } | CaError::Sign(_) => {
                Status::internal(e.to_string())
            }
        }
    }
}

fn impersonated(req: &IstioCertificateRequest) -> Result<Option<SpiffeId>, Status> {
    let Some(v) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &v.kind {
        Some(prost_types::value::Kind::StringValue(s)) => {
            SpiffeId::parse(s).map(Some).map_err(|e| {
                Status::invalid_argument(format!("metadata {IMPERSONATED_IDENTITY}: {e}"))
            })
        }
        _ => Err(Status::invalid_argument(format!(
            "metadata {IMPERSONATED_IDENTITY} must be a string"
        ))),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = auth::authenticate(self.auth.as_ref(), request.metadata())
            .await
            .inspect_err(|e| warn!(error = %e, "refused certificate request"))?;
        let req = request.into_inner();
        let (id, csr) = self.ca.requested_identity(&req.csr).inspect_err(|e| {
            warn!(caller = %caller, error = %e, "refused certificate request");
        })?;
        if let Some(imp) = impersonated(&req)?
            && imp != id
        {
            return Err(Status::invalid_argument(format!(
                "CSR is for {id} but {IMPERSONATED_IDENTITY} says {imp}"
            )));
        }
        match &caller {
            Caller::Node(node) => {
                if !self.workloads.node_runs(node, &id) {
                    warn!(caller = %caller, identity = %id, "refused certificate: no such workload on the node");
                    return Err(Status::permission_denied(format!(
                        "node {node} runs no workload with identity {id}; a node proxy may only \
                         request identities of pods scheduled on its node"
                    )));
                }
            }
            Caller::Identity(own) => {
                if own != &id {
                    warn!(caller = %caller, identity = %id, "refused certificate: not the caller's identity");
                    return Err(Status::permission_denied(format!(
                        "caller {own} may only request its own identity, not {id}"
                    )));
                }
            }
        }
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => self.default_ttl,
        };
        let issued = self.ca.issue(&id, &csr, ttl)?;
        info!(caller = %caller, identity = %id, not_after = %issued.not_after, "issued workload certificate");
        metrics::counter!("cairn_ca_certificates_issued_total").increment(1);
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: issued.chain,
        }))
    }
}
