//! A keep-alive HTTP/1.1 connection to a target, on hyper's low-level client: one connection per
//! load task, requests sent one after another (closed loop), no pooling or retries in the way of
//! the measurement.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::ServiceError;

/// One HTTP/1.1 keep-alive connection.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

/// Status and body of one answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// The body as (lossy) text, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self, context: &str) -> Result<serde_json::Value, ServiceError> {
        serde_json::from_slice(&self.body).map_err(|e| ServiceError::Answer {
            context: context.to_owned(),
            detail: format!("not JSON ({e}): {}", self.text()),
        })
    }

    /// Fail unless the status is `expected`.
    pub fn expect(self, expected: u16, context: &str) -> Result<Self, ServiceError> {
        if self.status == expected {
            Ok(self)
        } else {
            Err(ServiceError::Status {
                context: context.to_owned(),
                status: self.status,
                body: self.text(),
            })
        }
    }
}

impl HttpConn {
    /// Open a connection to `addr` (TCP_NODELAY on).
    pub async fn connect(addr: SocketAddr) -> Result<Self, ServiceError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(ServiceError::io(format!("connect to {addr}")))?;
        stream
            .set_nodelay(true)
            .map_err(ServiceError::io("set TCP_NODELAY"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ServiceError::Http {
                context: format!("handshake with {addr}"),
                source,
            })?;
        tokio::spawn(async move {
            // Ends when the connection closes; errors surface on the next request.
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    /// Send one request and read the whole answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, ServiceError> {
        let http_err = |source| ServiceError::Http {
            context: format!("{method} {path}"),
            source,
        };
        self.sender.ready().await.map_err(http_err)?;
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, &self.host);
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| ServiceError::BadRequest(path.to_owned()))?;
        let resp = self.sender.send_request(req).await.map_err(http_err)?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<Answer, ServiceError> {
        self.request(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&mut self, path: &str, body: Bytes) -> Result<Answer, ServiceError> {
        self.request(Method::POST, path, Some(body)).await
    }
}
