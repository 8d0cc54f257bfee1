//! The admin listener (port 15020) both proxies serve: HTTP/1.1, one path -> one
//! answer, rendered by the proxy.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

/// An admin page: status, content type, body.
pub struct Page {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Page {
    pub fn ok(content_type: &'static str, body: impl Into<String>) -> Self {
        Page {
            status: StatusCode::OK,
            content_type,
            body: body.into(),
        }
    }

    pub fn with_status(status: StatusCode, body: impl Into<String>) -> Self {
        Page {
            status,
            content_type: "text/plain",
            body: body.into(),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body)));
        *resp.status_mut() = self.status;
        if let Ok(v) = self.content_type.parse() {
            resp.headers_mut().insert(CONTENT_TYPE, v);
        }
        resp
    }
}

/// Serves `page(path)` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, page: Arc<dyn Fn(&str) -> Page + Send + Sync>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin accept failed; retrying in 100ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let page = page.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = page(req.uri().path()).into_response();
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                warn!(src.addr = %peer, error = %e, "admin connection error");
            }
        });
    }
}
