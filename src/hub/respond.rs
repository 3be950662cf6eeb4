//! HTTP responses of the hub: JSON, errors as `{ code, message }`, and
//! server-sent event streams.

use std::convert::Infallible;

use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use super::json::value;
use super::view::ErrorView;

pub(super) type Body = BoxBody<Bytes, Infallible>;

pub(super) fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(super) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    full(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    json_bytes(status, serde_json::to_vec(v).expect("JSON serialises"))
}

/// A JSON answer already serialised.
pub(super) fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    full(status, "application/json", body.into())
}

/// An error as the API returns it: `{ code, message }`.
pub(super) fn error(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let e = ErrorView {
        code,
        message: message.to_string(),
    };
    json_response(status, &value(e))
}

/// A server-sent event stream fed by `rx`.
pub(super) fn event_stream(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// One server-sent event; `data` is JSON (one line).
pub(super) fn sse(event: &str, id: Option<u64>, data: &[u8]) -> Bytes {
    let mut s = Vec::with_capacity(data.len() + 40);
    if let Some(id) = id {
        s.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    s.extend_from_slice(b"event: ");
    s.extend_from_slice(event.as_bytes());
    s.extend_from_slice(b"\ndata: ");
    s.extend_from_slice(data);
    s.extend_from_slice(b"\n\n");
    Bytes::from(s)
}
