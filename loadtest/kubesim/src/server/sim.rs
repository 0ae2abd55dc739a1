//! The `/sim/` control endpoints (faults, readiness, nodes, history).

use super::*;

pub(super) async fn sim_endpoint(
    app: &Arc<App>,
    method: &Method,
    rest: &str,
    body: &[u8],
) -> Response<Body> {
    let parse = |b: &[u8]| -> ApiResult<Value> {
        if b.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(b)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let res: ApiResult<Value> = match (method.clone(), segs.as_slice()) {
        (Method::GET, ["report"]) => {
            let st = app.store.lock();
            serde_json::to_value(st.recorder.report(app.store.elapsed_ms()))
                .map_err(|e| ApiError::internal(e.to_string()))
        }
        (Method::GET, ["faults"]) => {
            serde_json::to_value(app.faults.get()).map_err(|e| ApiError::internal(e.to_string()))
        }
        (Method::PUT, ["faults"]) | (Method::POST, ["faults"]) => parse(body).and_then(|v| {
            let cfg: FaultConfig = serde_json::from_value(v)
                .map_err(|e| ApiError::bad_request(format!("invalid fault config: {e}")))?;
            app.faults.set(cfg.clone());
            serde_json::to_value(cfg).map_err(|e| ApiError::internal(e.to_string()))
        }),
        (Method::POST, ["compact"]) => Ok(json!({"compactedThrough": app.store.compact()})),
        (Method::POST, ["drop-watches"]) => {
            app.faults.drop_watches();
            Ok(json!({"dropped": true}))
        }
        (Method::GET, ["requests"]) => serde_json::to_value(app.store.commit_log())
            .map_err(|e| ApiError::internal(e.to_string())),
        (Method::POST, ["pods", ns, name, action]) => app
            .pods
            .act(ns, name, action)
            .map(|_| json!({"pod": format!("{ns}/{name}"), "action": action})),
        (Method::POST, ["nodes", node, action]) => app
            .pods
            .node(node, action)
            .map(|n| json!({"node": node, "action": action, "pods": n})),
        _ => Err(ApiError::new(
            404,
            "NotFound",
            format!("no such simulator endpoint: /sim/{rest}"),
        )),
    };
    match res {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(&e),
    }
}
