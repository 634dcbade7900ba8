//! The router's HTTP API end to end, in one process: a CPU worker behind its gRPC service on
//! 127.0.0.1, the router in front, and a real HTTP client (reqwest) parsing JSON and SSE.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completion_equals_the_engine_and_streams_the_same_text() {
    let c = start(RouterConfig::default(), 4).await;
    let prompt = "The quick brown fox";
    let expected = c.direct(prompt, 20);
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], expected);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 20);
    assert_eq!(body["object"], "text_completion");

    let response = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .json(
            &json!({"prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["text"].as_str())
        .collect();
    assert_eq!(streamed, expected);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_uses_the_world_format_and_stops_at_the_turn_end() {
    let c = start(RouterConfig::default(), 4).await;
    let (status, body) = c
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                   "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(!content.starts_with(' ') && !content.contains("\n\n"));
    let lps = choice["logprobs"]["content"].as_array().unwrap();
    assert!(!lps.is_empty());
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(
        body["usage"]["prompt_tokens"], 7,
        "User: hi\\n\\nAssistant: is 7 tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let c = start(
        RouterConfig {
            max_prompt_tokens: 50,
            max_body_bytes: 10_000,
            ..RouterConfig::default()
        },
        2,
    )
    .await;
    let cases = [
        (json!({"model": "nope", "prompt": "x"}), 404, Some("model")),
        (
            json!({"prompt": "x", "max_tokens": -1}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"prompt": "x", "temperature": 7}),
            400,
            Some("temperature"),
        ),
        (json!({"prompt": "word ".repeat(100)}), 400, Some("prompt")),
        (json!({"prompt": [70000]}), 400, Some("prompt")),
        (json!({"prompt": ""}), 400, Some("prompt")),
        (json!({"max_tokens": 3}), 400, Some("prompt")),
    ];
    for (body, status, param) in cases {
        let (got, err) = c.post("/v1/completions", body.clone()).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert_eq!(err["error"]["param"].as_str(), param, "{body} -> {err}");
        assert!(err["error"]["message"].as_str().is_some());
    }
    let r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_json");
    let r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .body(vec![b' '; 20_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Still serving.
    let (status, _) = c
        .post("/v1/completions", json!({"prompt": "ok", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailing_space_after_a_colon_is_removed_with_a_warning() {
    let c = start(RouterConfig::default(), 2).await;
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "Question: 1+1\n\nAnswer: ", "max_tokens": 3, "temperature": 0,
                   "echo": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["warnings"][0].as_str().unwrap().contains("space"));
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("Question: 1+1\n\nAnswer:"));
    assert_eq!(
        &text["Question: 1+1\n\nAnswer:".len()..],
        c.direct("Question: 1+1\n\nAnswer:", 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_stop_strings_and_the_small_routes() {
    let c = start(RouterConfig::default(), 4).await;
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": ["a", "b"], "n": 2, "max_tokens": 4, "seed": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 4);

    // A stop string taken from the greedy continuation itself must cut the text before it.
    let full = c.direct("Hello", 12);
    let stop: String = full.chars().skip(3).take(2).collect();
    let (_, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 12, "temperature": 0, "stop": stop}),
        )
        .await;
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        body["choices"][0]["finish_reason"], "stop",
        "{full:?} / {stop:?}"
    );
    assert_eq!(text, &full[..full.find(&stop).unwrap()]);

    let (_, t) = c.post("/tokenize", json!({"prompt": "User: hi"})).await;
    assert_eq!(t["tokens"], json!([24281, 59, 4571]));
    let (_, d) = c
        .post("/detokenize", json!({"tokens": [24281, 59, 4571]}))
        .await;
    assert_eq!(d["prompt"], "User: hi");
    let models: Value = c
        .http
        .get(format!("{}/v1/models", c.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let ready = c
        .http
        .get(format!("{}/ready", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_share_one_prefill_and_equal_single_requests_with_their_seeds() {
    let c = start(RouterConfig::default(), 4).await;
    let prompt = "The quick brown fox jumps over the lazy dog, and then";
    let sampled = |n: u32, seed: u64| {
        json!({"prompt": prompt, "n": n, "seed": seed, "max_tokens": 6,
               "temperature": 1.0, "top_p": 0.9})
    };
    let (status, body) = c.post("/v1/completions", sampled(3, 40)).await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    let prompt_tokens = c.tokenizer.encode(prompt).unwrap().len() as u64;
    // The prompt counts once, however many choices share it.
    assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(body["usage"]["completion_tokens"], 18);
    let mut texts = Vec::new();
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        let (_, alone) = c.post("/v1/completions", sampled(1, 40 + i as u64)).await;
        assert_eq!(choice["text"], alone["choices"][0]["text"], "choice {i}");
        texts.push(choice["text"].as_str().unwrap().to_owned());
    }
    texts.dedup();
    assert!(texts.len() > 1, "every choice is the same: {texts:?}");
}

/// With the default overcommit a worker holds a queue of its own, and its engine preempts a
/// long generation that holds every slot: a short request sent behind it finishes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_request_is_not_stuck_behind_a_long_one_holding_every_slot() {
    let c = start(RouterConfig::default(), 1).await;
    let long = json!({"prompt": "a", "max_tokens": 1000, "temperature": 0,
                      "stream": true});
    let mut running = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    running
        .chunk()
        .await
        .unwrap()
        .expect("the long stream started");
    // Reads the long stream as it arrives and notes when it ends.
    let long_end = tokio::spawn(async move {
        while running.chunk().await.unwrap().is_some() {}
        tokio::time::Instant::now()
    });
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "b", "max_tokens": 3, "temperature": 0}),
        )
        .await;
    let short_end = tokio::time::Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let long_end = long_end.await.unwrap();
    assert!(
        short_end < long_end,
        "the short request waited for the long one to end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after_and_a_client_leaving_frees_the_slot() {
    let c = start_with_queue(RouterConfig::default(), 1, 0).await;
    let long = json!({"prompt": "a", "max_tokens": 8000, "stream": true});
    let mut running = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    running.chunk().await.unwrap().expect("the stream started");
    let r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .json(&json!({"prompt": "b", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["type"], "rate_limit_error");
    // The client of the long stream goes away: its slot frees up and new requests run.
    drop(running);
    let mut status = 0;
    for _ in 0..100 {
        let (s, _) = c
            .post("/v1/completions", json!({"prompt": "b", "max_tokens": 1}))
            .await;
        status = s;
        if s == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
}

/// A request answered with an error while some of its choices wait for a worker: those choices
/// leave the queue at once and never run (they used to run their prefill and a token each, for
/// nobody, while holding the queue's places). Each generation the engine admits looks up its
/// prefix cache once, so hits + misses counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_of_a_request_that_already_failed_never_run() {
    let c = start_with_queue(RouterConfig::default(), 1, 2).await;
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![300 + i; 8]).collect();
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": prompts, "max_tokens": 4000}),
        )
        .await;
    // One choice runs (long enough that it cannot end by itself before the answer), two wait
    // in the queue of 2, the fourth finds it full.
    assert_eq!(status, 429, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cache = c.engine.stats().unwrap().cache;
    assert!(
        cache.hits + cache.misses <= 1,
        "{} generations ran for a request already answered",
        cache.hits + cache.misses
    );
    // The queue is empty again: a new request runs at once.
    let (status, _) = c
        .post("/v1/completions", json!({"prompt": "b", "max_tokens": 1}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_times_n_is_capped_before_anything_runs() {
    let c = start(RouterConfig::default(), 2).await;
    let many: Vec<Vec<u32>> = (0..129).map(|_| vec![300]).collect();
    let (status, body) = c
        .post("/v1/completions", json!({"prompt": many, "max_tokens": 0}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "prompt");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 128"),
        "{body}"
    );
    let nine: Vec<&str> = vec!["a"; 9];
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": nine, "n": 16, "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "n");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("144 choices"),
        "{body}"
    );
    let eight: Vec<&str> = vec!["a"; 8];
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": eight, "n": 16, "max_tokens": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 128);
}

/// Every continuation token comes back with its log-probabilities, so together they are held
/// to `max_prompt_tokens` (one 4 MiB request could otherwise ask for a 2.5 GB answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_continuations_of_one_score_request_are_capped_together() {
    let cfg = RouterConfig {
        max_prompt_tokens: 10,
        ..RouterConfig::default()
    };
    let c = start(cfg, 1).await;
    let six = vec![300u32; 6];
    let (status, body) = c
        .post(
            "/v1/score",
            json!({"context": [1], "continuations": [six, six]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "continuations");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("12 tokens"),
        "{body}"
    );
    let (status, body) = c
        .post(
            "/v1/score",
            json!({"context": [1], "continuations": [[300, 301], [302]]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_equals_the_engine_and_echo_logprobs_agree_with_it() {
    let c = start(RouterConfig::default(), 4).await;
    let context =
        "User: You are a very talented expert. Answer this question:\nAssistant: The answer is";
    let (status, body) = c
        .post(
            "/v1/score",
            json!({"context": context, "continuations": [" A", " B", " C", " D", " maybe not"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ctx = c.tokenizer.encode(context).unwrap();
    let conts: Vec<Vec<u32>> = [" A", " B", " C", " D", " maybe not"]
        .iter()
        .map(|t| c.tokenizer.encode(t).unwrap())
        .collect();
    let direct = c
        .engine
        .score(rwkv_engine::ScoreRequest {
            tenant: "direct".into(),
            context: ctx.clone(),
            continuations: conts.clone(),
            top_logprobs: None,
        })
        .unwrap();
    for (i, s) in direct.scores.iter().enumerate() {
        let got: Vec<f32> = body["scores"][i]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, s.logprobs, "continuation {i}");
        assert_eq!(body["scores"][i]["greedy"], s.greedy);
    }

    // lm-eval style: echo + logprobs + max_tokens 0 gives the prompt's own log-probabilities.
    let full: Vec<u32> = ctx.iter().chain(&conts[4]).copied().collect();
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": full, "max_tokens": 0, "echo": true, "logprobs": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    let token_lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_lps.len(), full.len());
    assert!(token_lps[0].is_null());
    let tail: Vec<f32> = token_lps[ctx.len()..]
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let expected = &direct.scores[4].logprobs;
    for (a, b) in tail.iter().zip(expected) {
        assert!((a - b).abs() < 1e-4, "{tail:?} vs {expected:?}");
    }
    assert_eq!(lp["top_logprobs"][1].as_object().unwrap().len(), 1);
    assert_eq!(
        body["choices"][0]["text"],
        context.to_owned() + " maybe not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_tenant_isolation_and_per_tenant_limits() {
    let tenants = TenantsFile {
        tenants: vec![
            tenant("alpha", "key-a", true),
            tenant("beta", "key-b", false),
        ],
    };
    let c = start_full(RouterConfig::default(), 4, 256, Some(tenants)).await;
    let post = |key: Option<&'static str>, body: Value| {
        let mut r = c
            .http
            .post(format!("{}/v1/completions", c.base))
            .json(&body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        r.send()
    };
    let prompt = json!({"prompt": "A shared prefix that both tenants send", "max_tokens": 2,
                        "temperature": 0});
    for key in [None, Some("wrong")] {
        let r = post(key, prompt.clone()).await.unwrap();
        assert_eq!(r.status(), 401);
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_api_key");
    }
    // Health and readiness need no key.
    let r = c
        .http
        .get(format!("{}/ready", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The same prompt twice for alpha: the second prefill is served from alpha's cache; beta
    // sending the same prompt must not hit alpha's cached state.
    // (A continuation of the prompt, as a chat resending its history: the cached state is the
    // end of the first prompt, and at least one new token must be fed to get logits.)
    let usage = |v: Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let ids: Vec<u32> = (100..140).collect();
    let longer: Vec<u32> = (100..150).collect();
    let ask = |ids: &[u32]| json!({"prompt": ids, "max_tokens": 2, "temperature": 0});
    let first: Value = post(Some("key-a"), ask(&ids))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let again: Value = post(Some("key-a"), ask(&longer))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let other: Value = post(Some("key-b"), ask(&longer))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage(first), 0);
    assert!(
        usage(again) > 0,
        "alpha's second request reuses alpha's state"
    );
    assert_eq!(usage(other), 0, "beta never sees alpha's cached state");

    // One request at a time for beta: a second concurrent one gets 429 with Retry-After.
    let mut long = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .bearer_auth("key-b")
        .json(&json!({"prompt": "x", "max_tokens": 4000, "stream": true}))
        .send()
        .await
        .unwrap();
    long.chunk().await.unwrap();
    let r = post(Some("key-b"), prompt.clone()).await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Alpha is not affected by beta's limit.
    assert_eq!(
        post(Some("key-a"), prompt.clone()).await.unwrap().status(),
        200
    );
    drop(long);

    // /metrics needs an admin key.
    let metrics = |key: &'static str| {
        c.http
            .get(format!("{}/metrics", c.base))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(metrics("key-b").await.unwrap().status(), 403);
    assert_ne!(metrics("key-a").await.unwrap().status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_starve_another() {
    let unlimited = |name: &str, key: &str| TenantConfig {
        max_concurrent: None,
        ..tenant(name, key, false)
    };
    let tenants = TenantsFile {
        tenants: vec![unlimited("flood", "key-f"), unlimited("quiet", "key-q")],
    };
    // One slot (two requests in flight with the default overcommit): the others wait in the
    // router's queue.
    let c = start_full(RouterConfig::default(), 1, 256, Some(tenants)).await;
    let done = Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
    let send = |key: &'static str, who: &'static str| {
        let (http, base, done) = (c.http.clone(), c.base.clone(), done.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{base}/v1/completions"))
                .bearer_auth(key)
                .json(&json!({"prompt": "flood", "max_tokens": 24, "temperature": 0}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            done.lock().unwrap().push(who);
        })
    };
    let mut flood: Vec<_> = (0..16).map(|_| send("key-f", "flood")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = send("key-q", "quiet");
    // More flood arrives after the quiet request: arrival order alone would not save it either.
    tokio::time::sleep(Duration::from_millis(100)).await;
    flood.extend((0..8).map(|_| send("key-f", "flood")));
    quiet.await.unwrap();
    let before = done.lock().unwrap().len();
    for f in flood {
        f.await.unwrap();
    }
    // The quiet tenant's request arrived behind 16 queued flood requests (8 more came after it).
    // Fair queueing serves it right after the flood's head of line; the bound leaves room for
    // scheduling jitter on a loaded machine (without fair queueing it finished 22nd of 25).
    assert!(
        before <= 8,
        "the quiet tenant's request finished after {} others: {:?}",
        before - 1,
        done.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_continue_the_callers_trace_or_start_one() {
    let c = start(RouterConfig::default(), 2).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .header("traceparent", parent)
        .json(&json!({"prompt": "hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let ours = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let ours = rwkv_proto::TraceContext::parse(&ours).unwrap();
    let theirs = rwkv_proto::TraceContext::parse(parent).unwrap();
    assert_eq!(
        ours.trace_id, theirs.trace_id,
        "the caller's trace continues"
    );
    assert_ne!(ours.span_id, theirs.span_id, "in a span of our own");

    // Without (or with a broken) traceparent, each request starts its own trace.
    let mut ids = Vec::new();
    for header in [None, Some("00-garbage")] {
        let mut r = c.http.get(format!("{}/v1/models", c.base));
        if let Some(h) = header {
            r = r.header("traceparent", h);
        }
        let response = r.send().await.unwrap();
        let t = response.headers()["traceparent"].to_str().unwrap();
        ids.push(rwkv_proto::TraceContext::parse(t).unwrap().trace_id);
    }
    assert_ne!(ids[0], ids[1]);
}
