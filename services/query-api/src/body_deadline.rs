//! Slow request bodies are cut off: actix-web's `client_request_timeout` covers the request head
//! only, so without this a client that sends its headers and then a byte now and then holds a
//! connection (and a worker's attention) for as long as it likes.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::{InternalError, PayloadError};
use actix_web::http::ConnectionType;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{HttpMessage, ResponseError};
use futures_util::Stream;
use tokio::time::Sleep;

use crate::error::QueryError;

/// Middleware (with `from_fn`): the body must have arrived `timeout` after the request head did,
/// or the request is answered `408` and its connection closed (what is left of the body is
/// unread, so the connection cannot carry another request).
pub async fn limit(
    timeout: Duration,
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let expired = Rc::new(Cell::new(false));
    let body = Deadline {
        inner: req.take_payload(),
        deadline: Box::pin(tokio::time::sleep(timeout)),
        expired: expired.clone(),
    };
    req.set_payload(Payload::Stream {
        payload: Box::pin(body),
    });
    let result = next.call(req).await;
    if !expired.get() {
        return result.map(ServiceResponse::map_into_boxed_body);
    }
    // Whatever the handler made of the cut-off body (a 400 for truncated JSON), the cause is
    // the client's slowness.
    let mut response = QueryError::BodyTimeout.error_response();
    response
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    match result {
        Ok(answered) => Ok(ServiceResponse::new(answered.into_parts().0, response)),
        Err(_) => Err(InternalError::from_response(QueryError::BodyTimeout, response).into()),
    }
}

/// The request's body, ending in an error once the deadline has passed.
struct Deadline {
    inner: Payload,
    deadline: Pin<Box<Sleep>>,
    expired: Rc<Cell<bool>>,
}

impl Stream for Deadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.expired.get() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut this.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.set(true);
            return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body took too long to arrive",
            )))));
        }
        Poll::Pending
    }
}
