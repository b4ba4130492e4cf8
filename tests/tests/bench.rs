//! The benchmark program runs in a seconds-long form in the test suite: `pcg-bench --quick`
//! drives every scenario with small counts against real processes, and exits non-zero when a
//! command is lost or executed twice, or a tunnel does not come back after a restart.

#![allow(clippy::unwrap_used)]

#[test]
fn pcg_bench_quick_loses_and_repeats_nothing() {
    let dir = pcg_e2e::test_dir();
    let out = dir.path().join("bench.json");
    let run = std::process::Command::new(pcg_e2e::bin("pcg-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .env("PCG_BIN_DIR", pcg_e2e::bin_dir())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "pcg-bench --quick failed:\n{text}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let scenarios = v["scenarios"].as_array().unwrap();
    assert!(scenarios.len() >= 4, "{v}");
    for s in scenarios {
        assert!(s["commands_per_s"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The light load's floor on this machine is measured beside it, with and without syncs.
    let floors: Vec<_> = scenarios
        .iter()
        .filter(|s| s["label"].as_str().unwrap().starts_with("floor: "))
        .collect();
    assert_eq!(floors.len(), 2, "{v}");
    assert!(
        floors.iter().all(|s| s["p50_ms"].as_f64().unwrap() > 0.0),
        "{v}"
    );
    // No daemon runs in the floor: its rows carry no daemon costs, where the light load's do.
    assert!(
        floors.iter().all(|s| s["saas_syncs_per_command"].is_null()),
        "{v}"
    );
    let light = scenarios
        .iter()
        .find(|s| s["label"] == "1 gateway, 1 in flight")
        .expect("the light-load row");
    assert!(
        light["saas_syncs_per_command"].as_f64().unwrap() > 0.0,
        "{v}"
    );
}
