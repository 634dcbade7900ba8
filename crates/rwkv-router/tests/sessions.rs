//! `/v1/sessions` end to end: a CPU worker behind gRPC, the router in front, reqwest as client.

mod common;

use common::*;

impl Cluster {
    async fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post_as(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn delete(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut r = self.http.delete(format!("{}{path}", self.base));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Sends a user message greedily and returns the reply's text.
    async fn say(&self, id: &str, text: &str) -> String {
        let (status, body) = self
            .post(
                &format!("/v1/sessions/{id}/messages"),
                json!({"content": text, "max_tokens": 6, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["session"], id);
        assert_eq!(body["object"], "chat.completion");
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

fn id_of(session: &Value) -> String {
    session["id"].as_str().unwrap().to_owned()
}

fn turns(session: &Value) -> Vec<u64> {
    session["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_continue_fork_rewind_export_and_import_exactly() {
    let c = start(RouterConfig::default(), 4).await;
    let (status, session) = c
        .post("/v1/sessions", json!({"system": "You are terse."}))
        .await;
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["object"], "session");
    let id = id_of(&session);
    let system_tokens = c.tokenizer.encode("System: You are terse.\n\n").unwrap();
    assert_eq!(turns(&session), vec![system_tokens.len() as u64]);

    c.say(&id, "Hello there").await;
    let (_, after_one) = c.get(&format!("/v1/sessions/{id}"), None).await;
    assert_eq!(turns(&after_one).len(), 2, "{after_one}");

    // A fork and the original continue identically.
    let (status, fork) = c.post(&format!("/v1/sessions/{id}/fork"), json!({})).await;
    assert_eq!(status, 201, "{fork}");
    let fork = id_of(&fork);
    assert_ne!(fork, id);
    let second = c.say(&id, "And then?").await;
    assert_eq!(c.say(&fork, "And then?").await, second);

    // Rewound to the end of turn 1, exported and imported: the same continuation everywhere.
    let (status, rewound) = c
        .post(&format!("/v1/sessions/{id}/rewind"), json!({"turn": 1}))
        .await;
    assert_eq!(status, 200, "{rewound}");
    assert_eq!(turns(&rewound), turns(&after_one));
    assert_eq!(rewound["tokens"], after_one["tokens"]);
    let export = c
        .http
        .get(format!("{}/v1/sessions/{id}/export", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(export.status().as_u16(), 200);
    let bytes = export.bytes().await.unwrap();
    assert!(!bytes.is_empty());
    // The rewound session replays turn 2 exactly (its state is rebuilt from the cache).
    assert_eq!(c.say(&id, "And then?").await, second);

    let imported = c
        .http
        .post(format!("{}/v1/sessions/import", c.base))
        .header("content-type", "application/octet-stream")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status().as_u16(), 201);
    let imported: Value = imported.json().await.unwrap();
    assert_eq!(imported["tokens"], after_one["tokens"]);
    assert_eq!(c.say(&id_of(&imported), "And then?").await, second);

    // A stream of the same turn after another rewind: same text, session tagged, [DONE].
    c.post(&format!("/v1/sessions/{id}/rewind"), json!({"turn": 1}))
        .await;
    let response = c
        .http
        .post(format!("{}/v1/sessions/{id}/messages", c.base))
        .json(&json!({"content": "And then?", "max_tokens": 6, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["session"], id.as_str());
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
    }
    assert_eq!(streamed.trim_end(), second);

    // Listed, then deleted.
    let (_, list) = c.get("/v1/sessions", None).await;
    let ids: Vec<String> = list["data"].as_array().unwrap().iter().map(id_of).collect();
    assert!(ids.contains(&id) && ids.contains(&fork), "{list}");
    let (status, deleted) = c.delete(&format!("/v1/sessions/{id}"), None).await;
    assert_eq!((status, &deleted["deleted"]), (200, &json!(true)));
    let (status, _) = c.get(&format!("/v1/sessions/{id}"), None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_tenant_scoped_quota_limited_and_validated() {
    let mut a = tenant("a", "key-a", false);
    a.max_sessions = Some(2);
    a.max_concurrent = None;
    let b = tenant("b", "key-b", false);
    let c = start_full(
        RouterConfig::default(),
        4,
        64,
        Some(TenantsFile {
            tenants: vec![a, b],
        }),
    )
    .await;
    let (status, session) = c.post_as("/v1/sessions", Some("key-a"), json!({})).await;
    assert_eq!(status, 201, "{session}");
    let id = id_of(&session);

    // Another tenant sees nothing: 404 everywhere, and an empty list.
    for (status, body) in [
        c.get(&format!("/v1/sessions/{id}"), Some("key-b")).await,
        c.post_as(
            &format!("/v1/sessions/{id}/messages"),
            Some("key-b"),
            json!({"content": "hi"}),
        )
        .await,
        c.post_as(&format!("/v1/sessions/{id}/fork"), Some("key-b"), json!({}))
            .await,
        c.delete(&format!("/v1/sessions/{id}"), Some("key-b")).await,
    ] {
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "session_not_found", "{body}");
    }
    let (_, list) = c.get("/v1/sessions", Some("key-b")).await;
    assert_eq!(list["data"], json!([]));
    let (status, _) = c.get(&format!("/v1/sessions/{id}"), None).await;
    assert_eq!(status, 401);

    // The quota: two sessions, then 429 with Retry-After until one is deleted.
    let (status, second) = c.post_as("/v1/sessions", Some("key-a"), json!({})).await;
    assert_eq!(status, 201);
    let refused = c
        .http
        .post(format!("{}/v1/sessions", c.base))
        .bearer_auth("key-a")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_quota_exceeded");
    let (status, _) = c
        .post_as(&format!("/v1/sessions/{id}/fork"), Some("key-a"), json!({}))
        .await;
    assert_eq!(status, 429);
    c.delete(&format!("/v1/sessions/{}", id_of(&second)), Some("key-a"))
        .await;
    let (status, _) = c.post_as("/v1/sessions", Some("key-a"), json!({})).await;
    assert_eq!(status, 201);

    // Bad input names its field; the session keeps working afterwards.
    let path = format!("/v1/sessions/{id}/messages");
    for (body, field) in [
        (json!({"content": "hi", "stop": ["x"]}), "stop"),
        (json!({"content": "hi", "n": 2}), "n"),
        (json!({"content": "  \n "}), "content"),
        (json!({}), "content"),
        (json!({"content": "hi", "temperature": 9}), "temperature"),
    ] {
        let (status, err) = c.post_as(&path, Some("key-a"), body).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["param"], field, "{err}");
    }
    let (status, err) = c
        .post_as(
            &format!("/v1/sessions/{id}/rewind"),
            Some("key-a"),
            json!({"turn": 7}),
        )
        .await;
    assert_eq!(
        (status, &err["error"]["param"]),
        (400, &json!("turn")),
        "{err}"
    );
    for bad in ["nope", "sess_zz_1", "sess_7731_1"] {
        let (status, err) = c.get(&format!("/v1/sessions/{bad}"), Some("key-a")).await;
        assert_eq!(status, 404, "{bad}: {err}");
    }
    let garbage = c
        .http
        .post(format!("{}/v1/sessions/import", c.base))
        .bearer_auth("key-b")
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status().as_u16(), 400);
    let (status, reply) = c
        .post_as(
            &path,
            Some("key-a"),
            json!({"content": "still here?", "max_tokens": 3}),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
}

/// A worker full of session tokens: a turn that would pass the total gets 429 (retry later,
/// or delete sessions), not a 503 blaming the worker, and the session is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_on_a_worker_full_of_sessions_is_a_429() {
    let engine = EngineConfig {
        max_sessions_tokens: 64,
        ..EngineConfig::default()
    };
    let c = start_engine(
        RouterConfig::default(),
        2,
        None,
        PoolConfig::default(),
        engine,
    )
    .await;
    let (status, session) = c.post("/v1/sessions", json!({})).await;
    assert_eq!(status, 201, "{session}");
    let id = id_of(&session);
    c.say(&id, "Hi").await;
    let (_, before) = c.get(&format!("/v1/sessions/{id}"), None).await;
    let long = "many words ".repeat(40);
    let (status, body) = c
        .post(
            &format!("/v1/sessions/{id}/messages"),
            json!({"content": long, "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert_error_mentions(&body, "full of sessions");
    let (_, after) = c.get(&format!("/v1/sessions/{id}"), None).await;
    assert_eq!(after["tokens"], before["tokens"]);
}
