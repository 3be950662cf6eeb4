//! HTTP responses of the hub: JSON, errors as `{ code, message }`, and
//! server-sent event streams.

use std::convert::Infallible;

use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub(super) type Body = BoxBody<Bytes, Infallible>;

pub(super) fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", body.into())
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec(v).expect("JSON serialises"),
    )
}

/// An error as the API returns it: `{ code, message }`.
pub(super) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json_response(status, &json!({ "code": code, "message": message.into() }))
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

/// One server-sent event.
pub(super) fn sse(event: &str, id: Option<u64>, data: &Value) -> Bytes {
    let mut s = String::new();
    if let Some(id) = id {
        s.push_str(&format!("id: {id}\n"));
    }
    s.push_str(&format!("event: {event}\ndata: {data}\n\n"));
    Bytes::from(s)
}
