//! A cap on an HTTP server's open connections that answers when it is reached.
//!
//! actix's own `max_connections` stops accepting past its limit: a new connection then waits,
//! unanswered, in the kernel's listen backlog until it times out, which a fleet cannot tell from a
//! dead server. Here every connection is counted from accept to close; one opened while the count is
//! over the cap has each of its requests answered 503 with `Retry-After` and `Connection: close`, so
//! the client knows at once to come back later (or to another replica), and the connection is gone.
//! Connections opened under the cap are never affected.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Extensions, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, ResponseError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::{ApiError, retry_after};

/// Answered whatever the count: a full replica is alive (an orchestrator must not restart it for
/// being busy) and its metrics are what shows it full. `/readyz` is refused like the API: not
/// ready for more.
const ALWAYS_ANSWERED: [&str; 2] = ["/healthz", "/metrics"];

/// Open connections and the cap; clone it into every worker's `on_connect` and middleware.
#[derive(Clone)]
pub struct ConnectionCap {
    shared: Arc<Shared>,
}

struct Shared {
    open: AtomicUsize,
    /// 0: no cap.
    cap: usize,
    open_gauge: Gauge,
    refused: Counter,
}

/// What `on_connect` leaves on a connection: whether it came over the cap, and its place in the
/// count, given back when actix drops the connection's data (at close).
struct Admission {
    over_cap: bool,
    _counted: Counted,
}

struct Counted(Arc<Shared>);

impl Drop for Counted {
    fn drop(&mut self) {
        let open = self.0.open.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.open_gauge.set(open as i64);
    }
}

impl ConnectionCap {
    /// Registers `http_connections_open` and `http_connections_refused_total` in `registry`.
    pub fn new(cap: usize, registry: &mut Registry) -> Self {
        let open_gauge = Gauge::default();
        let refused = Counter::default();
        registry.register(
            "http_connections_open",
            "HTTP connections open now (accepted, not yet closed)",
            open_gauge.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Requests answered 503 and closed because their connection came over http_max_connections",
            refused.clone(),
        );
        Self {
            shared: Arc::new(Shared {
                open: AtomicUsize::new(0),
                cap,
                open_gauge,
                refused,
            }),
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// For `HttpServer::on_connect`: counts the connection and notes whether it is over the cap.
    pub fn on_connect(&self, _io: &dyn Any, data: &mut Extensions) {
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.open_gauge.set(open as i64);
        data.insert(Admission {
            over_cap: self.shared.cap > 0 && open > self.shared.cap,
            _counted: Counted(self.shared.clone()),
        });
    }

    /// The middleware (`from_fn`): a request on a connection that came over the cap is answered
    /// 503 and its connection closed; the others pass.
    pub async fn admit<B: MessageBody>(
        self,
        req: ServiceRequest,
        next: Next<B>,
    ) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
        let over_cap = req
            .conn_data::<Admission>()
            .is_some_and(|admission| admission.over_cap);
        if !over_cap || ALWAYS_ANSWERED.contains(&req.path()) {
            return next.call(req).await.map(|r| r.map_into_left_body());
        }
        self.shared.refused.inc();
        let error = ApiError::unavailable(
            format!(
                "this server holds its limit of {} connections; try again later",
                self.shared.cap
            ),
            retry_after::BUSY_SECS,
        );
        let mut response: HttpResponse = error.error_response();
        response
            .head_mut()
            .set_connection_type(actix_web::http::ConnectionType::Close);
        Ok(req.into_response(response).map_into_right_body())
    }
}
