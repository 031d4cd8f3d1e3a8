//! The router: every route of SERVICE.md §3 with its method and body limit, the test-only routes
//! when enabled, the metrics/access-log middleware, and `/metrics` outside it (Dynamo does not
//! count scrapes). Unknown paths get axum's empty 404, wrong methods its empty 405.

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;

use super::{
    dump, events, handlers, observe, query, SharedState, DEFAULT_BODY_LIMIT, LARGE_BODY_LIMIT,
};

/// Build the service's router.
pub fn router(state: SharedState) -> Router {
    let large = || DefaultBodyLimit::max(LARGE_BODY_LIMIT);
    let query_budget = || from_fn_with_state(state.clone(), query::budgeted);
    let mut api = Router::new()
        .route("/health", get(handlers::health))
        .route("/register", post(handlers::register))
        .route("/unregister", post(handlers::unregister))
        .route("/workers", get(handlers::workers))
        .route(
            "/query",
            post(query::query).layer(large()).layer(query_budget()),
        )
        .route(
            "/query_by_hash",
            post(query::query_by_hash)
                .layer(large())
                .layer(query_budget()),
        )
        .route("/dump", get(dump::dump))
        .route("/register_peer", post(handlers::register_peer))
        .route("/deregister_peer", post(handlers::deregister_peer))
        .route("/peers", get(handlers::peers))
        .route("/reopen_logs", post(handlers::reopen_logs))
        .route("/events", post(events::post_events).layer(large()));
    if state.test_endpoints {
        api = api
            .route("/test/pause_listener", post(handlers::pause_listener))
            .route("/test/resume_listener", post(handlers::resume_listener))
            .route("/test/hold_dumps", post(dump::hold_dumps))
            .route("/test/release_dumps", post(dump::release_dumps));
    }
    api.layer(DefaultBodyLimit::max(DEFAULT_BODY_LIMIT))
        .layer(from_fn_with_state(state.clone(), observe::observe))
        .route("/metrics", get(handlers::metrics))
        .with_state(state)
}
