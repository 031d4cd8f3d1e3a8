//! Two kvindex processes in one NATS queue group: both index every event (the event
//! subscription has no queue group), and the query requests are shared between them — each
//! process answers some of them (counted by its own metrics, not by timing).

mod common;
mod nats_support;

use common::*;
use nats_support::*;
use serde_json::json;

const REQUESTS: usize = 40;

#[test]
fn two_processes_in_one_queue_group_share_the_queries() {
    let nats = NatsServer::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = [
        "--nats-url",
        nats.url.as_str(),
        "--nats-query-group",
        "routers",
    ];
    let a = start(da.path(), &args, &[]);
    let b = start(db.path(), &args, &[]);
    for s in [&a, &b] {
        for sub in ["events", "query"] {
            wait_subscribed(s, sub);
        }
    }
    let c = Client::connect(&nats.url);
    let h = local_hashes(&tokens(16), 4);
    let blocks: Vec<(u64, u64)> = h.iter().enumerate().map(|(i, &l)| (i as u64, l)).collect();
    c.publish_with_headers(
        "kvindex.events.m.default",
        headers(&[("Kvindex-Block-Size", "4")]),
        stored(7, 0, 1, None, &blocks).to_string().into_bytes(),
    );
    let expected = json!({"7": {"0": 16}});
    for s in [&a, &b] {
        wait_until("both processes indexed the event", || {
            s.post_json(
                "/query",
                &json!({"token_ids": tokens(16), "model_name": "m"}),
            )
            .json()["scores"]
                == expected
        });
    }
    for _ in 0..REQUESTS {
        let r = c.request(
            "kvindex.query.m.default",
            None,
            json!({"token_ids": tokens(16)}).to_string().into_bytes(),
        );
        assert_eq!(r.json()["scores"], expected);
    }
    let served = |s: &Server| {
        metric(
            s,
            "kvindex_nats_query_requests_total",
            &[("kind", "query"), ("outcome", "ok")],
        )
    };
    let (sa, sb) = (served(&a), served(&b));
    assert_eq!(sa + sb, REQUESTS as f64, "each request answered once");
    assert!(
        sa >= 1.0 && sb >= 1.0,
        "both processes served: {sa} and {sb}"
    );
}
