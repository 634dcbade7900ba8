//! `rwkv bench serve` against a real `rwkv serve` (the random-weight demo model on the CPU): a
//! two-point concurrency sweep whose JSON report and SVG plot are checked.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{free_port, Proc as Server};

fn get_status(port: u16, path: &str) -> Option<u16> {
    common::get_status(&format!("127.0.0.1:{port}"), path)
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("`{path}` missing in {v}"))
}

#[test]
fn concurrency_sweep_against_the_demo_server() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let server_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let port = free_port();
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_rwkv"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--slots", "8", "--backend", "cpu"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("start rwkv serve"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_status(port, "/ready") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the server never became ready:\n{}",
            server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let (json, svg) = (dir.path().join("out.json"), dir.path().join("out.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_rwkv"))
        .args([
            "bench",
            "serve",
            "--endpoint",
            &format!("http://127.0.0.1:{port}"),
        ])
        .args(["--num-prompts", "8", "--concurrency", "1,4"])
        .args(["--input-len", "16", "--output-len", "8"])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench serve failed:\n{stderr}\nserver:\n{}",
        server_log()
    );
    assert!(stderr.contains("Serving Benchmark Result"), "{stderr}");

    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["settings"]["sweep"], "concurrency");
    assert_eq!(report["settings"]["model"], "rwkv6-demo");
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for (point, concurrency) in points.iter().zip([1, 4]) {
        assert_eq!(point["concurrency"], concurrency, "{point}");
        assert_eq!(point["completed"], 8, "{point}");
        assert_eq!(point["failed"], 0, "{point}");
        assert!(f(point, "/output_throughput") > 0.0, "{point}");
        assert!(f(point, "/request_throughput") > 0.0, "{point}");
        assert!(
            f(point, "/total_token_throughput") > f(point, "/output_throughput"),
            "{point}"
        );
        // Token counts come from the server's usage: 16-word prompts are 16 World tokens.
        assert_eq!(f(point, "/mean_input_tokens"), 16.0, "{point}");
        let out_tokens = f(point, "/mean_output_tokens");
        assert!(out_tokens > 0.0 && out_tokens <= 8.0, "{point}");
        let (ttft, e2e) = (f(point, "/ttft_ms/mean"), f(point, "/e2e_ms/mean"));
        assert!(ttft > 0.0 && ttft <= e2e, "{point}");
        assert!(
            f(point, "/ttft_ms/max") <= f(point, "/e2e_ms/max"),
            "{point}"
        );
        assert!(f(point, "/itl_ms/n") > 0.0, "{point}");
    }

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.len() > 10_000, "a near-empty plot: {} bytes", svg.len());
    for text in [
        "Time to first token",
        "Inter-token latency",
        "p99",
        "output tok/s",
    ] {
        assert!(svg.contains(text), "the plot has no `{text}`");
    }
}
