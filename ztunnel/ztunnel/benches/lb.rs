//! Random vs round robin endpoint choice, measured on the load each endpoint gets.
//!
//! A service's connections are spread by every ztunnel independently: each node
//! picks for its own pods, knowing nothing of the others. What matters is how even
//! the endpoints' totals end up. Round robin is perfect within one ztunnel but each
//! ztunnel's counter starts somewhere; random needs no state at all.
//!
//! `cargo bench -p cairn-ztunnel --bench lb -- --bench` (what `cargo xtask bench lb`
//! runs); under `cargo test` a few trials run as a smoke test. Prints the mean over
//! trials of max/mean endpoint load (1.00 = perfectly even) per scenario and policy.

use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Clone, Copy)]
enum Policy {
    Random,
    /// Each ztunnel's counter starts at the first endpoint (a fresh process).
    RoundRobinFromZero,
    /// Each ztunnel's counter starts at a random endpoint.
    RoundRobinRandomStart,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Random => "random",
            Policy::RoundRobinFromZero => "round robin, counter from 0",
            Policy::RoundRobinRandomStart => "round robin, random start",
        }
    }
}

/// `ztunnels` proxies each open `per_ztunnel` connections to `endpoints` endpoints;
/// returns max/mean of the endpoints' connection counts.
fn imbalance(
    rng: &mut StdRng,
    policy: Policy,
    ztunnels: usize,
    per_ztunnel: usize,
    endpoints: usize,
) -> f64 {
    let mut load = vec![0u64; endpoints];
    for _ in 0..ztunnels {
        let mut next = match policy {
            Policy::RoundRobinRandomStart => rng.random_range(0..endpoints),
            _ => 0,
        };
        for _ in 0..per_ztunnel {
            let pick = match policy {
                Policy::Random => rng.random_range(0..endpoints),
                Policy::RoundRobinFromZero | Policy::RoundRobinRandomStart => {
                    let p = next;
                    next = (next + 1) % endpoints;
                    p
                }
            };
            load[pick] += 1;
        }
    }
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    let mean = (ztunnels * per_ztunnel) as f64 / endpoints as f64;
    max / mean
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let trials = if full { 2_000 } else { 20 };
    // (description, ztunnels, connections per ztunnel, endpoints)
    let scenarios = [
        ("one node, 3 endpoints, 1,000 connections", 1, 1_000, 3),
        ("100 nodes, 3 endpoints, 2 connections each", 100, 2, 3),
        ("100 nodes, 10 endpoints, 5 connections each", 100, 5, 10),
        ("20 nodes, 4 endpoints, 50 connections each", 20, 50, 4),
    ];
    let policies = [
        Policy::Random,
        Policy::RoundRobinFromZero,
        Policy::RoundRobinRandomStart,
    ];
    let mut rng = StdRng::seed_from_u64(7);
    println!("<!-- lb:begin -->");
    println!(
        "Endpoint choice across independent ztunnels: mean over {trials} trials of max/mean connections per endpoint (1.00 = perfectly even).\n"
    );
    println!("| scenario | {} |", policies.map(Policy::name).join(" | "));
    println!("| --- | --- | --- | --- |");
    for (what, ztunnels, per, endpoints) in scenarios {
        let cells = policies.map(|p| {
            let total: f64 = (0..trials)
                .map(|_| imbalance(&mut rng, p, ztunnels, per, endpoints))
                .sum();
            let mean = total / trials as f64;
            assert!(mean >= 1.0, "max/mean below 1 is impossible");
            format!("{mean:.2}")
        });
        println!("| {what} | {} |", cells.join(" | "));
    }
    println!("<!-- lb:end -->");
}
