//! A minute of `kvferry soak`: transfers to `kvferry serve` children over TCP and shm while they are
//! killed, stopped and restarted and transfers are cancelled and registrations dropped mid-flight.
//! No byte may arrive wrong or land late, and the soaking process must not grow with the number of
//! restarts (it does dozens in a minute).

use std::process::Command;

#[test]
fn soak_for_a_minute_checks_every_byte_and_leaks_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(["soak", "--seconds", "60", "--json", "--seed", "7"])
        .output()
        .expect("kvferry soak runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvferry soak failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    for failure in ["mismatches", "bytes_after_cancel", "bytes_after_deregistration", "unexpected_errors", "late"] {
        assert_eq!(report["failures"][failure], 0, "{failure}: {stdout}");
    }
    let count = |what: &str| report[what].as_u64().unwrap();
    assert!(count("kills") > 5 && count("stops") > 5 && count("cancels") > 5 && count("deregistrations") > 5);
    assert!(count("bytes_checked") > 0);
    let (start, end) = (&report["start"], &report["end"]);
    let grown = |what: &str| end[what].as_u64().unwrap().saturating_sub(start[what].as_u64().unwrap());
    // Links to restarted targets replace the old ones: a few threads and descriptors for the links
    // in use at the end, not one per restart.
    assert!(grown("threads") <= 16, "threads grew by {}: {stdout}", grown("threads"));
    assert!(grown("fds") <= 32, "descriptors grew by {}: {stdout}", grown("fds"));
}
