//! Who is asking: the real client address, also behind a reverse proxy, and per-key rate limits.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpRequest;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

/// Proxies (Traefik) whose `X-Forwarded-For` is believed; parsed from `"10.0.0.0/8, 127.0.0.1"`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("trusted_proxies: {s:?} is not an address or CIDR range"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The address of whoever sent the request: the peer, unless the peer is a trusted proxy, then
    /// the right-most address in `X-Forwarded-For` that is not itself a trusted proxy (the left part
    /// of that header is whatever the client claimed, and proves nothing).
    pub fn client_addr(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        if !self.trusts(peer) {
            return Some(peer);
        }
        let forwarded = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter_map(|hop| hop.parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        Some(
            forwarded
                .into_iter()
                .rev()
                .find(|hop| !self.trusts(*hop))
                .unwrap_or(peer),
        )
    }
}

/// A rate limit per key (device id, token id, client address), in requests per second with a burst.
/// Keys not seen for a while are forgotten, so the memory stays bounded by the active keys.
#[derive(Clone)]
pub struct KeyedLimit {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl KeyedLimit {
    /// `per_second == 0` turns the limit off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
            let limiter = Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ));
            let sweep = Arc::downgrade(&limiter);
            // governor never forgets keys by itself: sweep while the limiter lives
            std::thread::spawn(move || {
                while let Some(limiter) = sweep.upgrade() {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                    drop(limiter);
                    std::thread::sleep(Duration::from_secs(60));
                }
            });
            limiter
        });
        Self { limiter }
    }

    /// `Err(wait)` when `key` is over its limit: retry after `wait`.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn request(peer: &str, forwarded: Option<&str>) -> HttpRequest {
        let mut r = TestRequest::default().peer_addr(format!("{peer}:4000").parse().unwrap());
        if let Some(f) = forwarded {
            r = r.insert_header(("x-forwarded-for", f));
        }
        r.to_http_request()
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 127.0.0.1").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // a client talking directly cannot claim another address
        assert_eq!(
            trusted.client_addr(&request("203.0.113.9", Some("1.2.3.4"))),
            Some(ip("203.0.113.9"))
        );
        // through Traefik: the address Traefik saw
        assert_eq!(
            trusted.client_addr(&request("10.0.0.2", Some("203.0.113.9"))),
            Some(ip("203.0.113.9"))
        );
        // a forged left part is skipped: the right-most untrusted hop counts
        assert_eq!(
            trusted.client_addr(&request("10.0.0.2", Some("6.6.6.6, 203.0.113.9, 10.0.0.3"))),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            trusted.client_addr(&request("127.0.0.1", None)),
            Some(ip("127.0.0.1"))
        );
        assert!(TrustedProxies::parse("not-an-address").is_err());
        assert!(TrustedProxies::parse("").unwrap().0.is_empty());
    }

    #[test]
    fn limits_apply_per_key() {
        let limit = KeyedLimit::new(1, 3);
        for _ in 0..3 {
            assert!(limit.check("a").is_ok());
        }
        let wait = limit.check("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limit.check("b").is_ok(), "another key has its own budget");
        let off = KeyedLimit::new(0, 0);
        assert!((0..1000).all(|_| off.check("a").is_ok()));
    }
}
