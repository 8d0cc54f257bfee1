//! Fault injection (VirtualService `fault`): a delay and/or an abort, each applied to a
//! percentage of requests, decided with the router's random source (seeded in tests).

use std::time::Duration;

use http::StatusCode;
use rand::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, Percent)>,
    pub abort: Option<(Abort, Percent)>,
}

/// How an aborted request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// A gRPC status code (1..=16), answered trailers-only with HTTP 200.
    Grpc(u32),
}

impl From<StatusCode> for Abort {
    fn from(s: StatusCode) -> Self {
        Abort::Http(s)
    }
}

/// 0.0..=100.0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percent(pub f64);

impl Percent {
    /// Whether this request is among the percentage.
    pub fn hit(self, rng: &mut impl Rng) -> bool {
        self.0 >= 100.0 || (self.0 > 0.0 && rng.random::<f64>() * 100.0 < self.0)
    }
}

/// What the fault does to one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

impl Fault {
    pub fn decide(&self, rng: &mut impl Rng) -> Decision {
        Decision {
            delay: self.delay.filter(|(_, p)| p.hit(rng)).map(|(d, _)| d),
            abort: self.abort.filter(|(_, p)| p.hit(rng)).map(|(s, _)| s),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn percentages_hold_over_many_requests() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let fault = Fault {
            delay: Some((Duration::from_millis(5), Percent(10.0))),
            abort: Some((StatusCode::SERVICE_UNAVAILABLE.into(), Percent(50.0))),
        };
        let n = 20_000;
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..n {
            let d = fault.decide(&mut rng);
            delayed += usize::from(d.delay.is_some());
            aborted += usize::from(d.abort.is_some());
        }
        let share = |k: usize| k as f64 * 100.0 / n as f64;
        assert!(
            (share(aborted) - 50.0).abs() < 1.5,
            "aborted {}%",
            share(aborted)
        );
        assert!(
            (share(delayed) - 10.0).abs() < 1.0,
            "delayed {}%",
            share(delayed)
        );
        let never = Fault {
            delay: None,
            abort: Some((StatusCode::BAD_GATEWAY.into(), Percent(0.0))),
        };
        assert_eq!(never.decide(&mut rng), Decision::default());
    }
}
