#!/usr/bin/env bash
# Runs every kvferry test on a fresh Debian machine with a Rust toolchain: installs what the tests
# need, checks formatting and lints, builds every target, runs the tests, and fails if none ran.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
# What the run has left on its disk, printed between stages: the builds, the venvs and the pip
# downloads together take most of a small machine's free space.
disk() { df -h --output=avail,target . | tail -1 | awk '{ print "disk: " $1 " free on " $2 }'; }

# A test run builds once: incremental state and pip's download cache would only take disk.
export CARGO_INCREMENTAL=0 PIP_NO_CACHE_DIR=1
disk

if ! command -v cargo >/dev/null; then
    echo "kvferry's tests need a Rust toolchain (1.88 or newer) on PATH" >&2
    exit 1
fi

# System packages the build and tests use.
packages=(build-essential pkg-config valgrind)
# The C++ example the C tests build with CMake (find_package(kvferry)).
packages+=(cmake)
# The HIP runtime the rocm tests load (no AMD GPU needed: they check the no-device path).
packages+=(libamdhip64-dev)
# The fabric transport: libfabric >= 1.17 headers and library, and fi_info.
packages+=(libfabric-dev libfabric-bin)
# The Python package: libpython for the workspace build of the extension crate, venv for its tests.
packages+=(python3-dev python3-venv)
# etcd for the discovery tests (they start their own on loopback); libzmq for KV events.
packages+=(etcd-server libzmq3-dev)
# curl (with --aws-sigv4) for scripts/garage.sh, which starts the S3 server of the remote tier's tests.
packages+=(curl)
# iperf3, which the vLLM two-host test measures its link with.
packages+=(iperf3)
# Optional back ends every CI run builds and tests, as `crate/feature` (each needs its packages above).
features=()
# GPU devices load their drivers at run time: they build anywhere and skip, saying why, without a GPU.
features+=(kvferry-cli/cuda kvferry-cli/rocm)
features+=(kvferry-cli/fabric)
features+=(kvferry-python/cuda kvferry-python/fabric kvferry-python/kv-events)
features+=(kvferry-cli/etcd kvferry-cli/kv-events)
# The decoders' fuzzing entry points, so that the committed corpora (fuzz/corpus) replay as tests.
features+=(kvferry-core/fuzzing kvferry-c/fuzzing)
feature_args=()
((${#features[@]})) && feature_args=(--features "${features[*]}")
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

# A real S3 server for the remote tier's tests: Garage, run as its own process (scripts/garage.sh),
# never linked; built once into ~/.cargo/bin (about 10 minutes on two cores).
garage_version=2.5.0
garage_bin="${KVFERRY_GARAGE:-$HOME/.cargo/bin/garage}"
if ! "$garage_bin" --version 2>/dev/null | grep -q "$garage_version"; then
    log "installing Garage $garage_version (cargo install)"
    cargo install garage --locked --version "$garage_version"
fi
export KVFERRY_GARAGE="$garage_bin"

# The Rust tests that must have run and passed: a run that executed none, or skipped the process
# tests, must not pass as green.
sentinels=(
    killing_the_target_mid_transfer_fails_fast_and_the_agent_moves_on
    blocks_move_both_ways_between_processes_byte_exact
    regions_match_reference
    cuda::tests::opening_without_a_device_is_a_typed_error
    rocm::tests::opening_without_a_device_is_a_typed_error
    host_memory_staged_through_the_host_device_moves_byte_exact
    gather_packs_blocks_in_order_and_scatter_puts_them_back
    the_codes_and_the_header_are_up_to_date
    the_store_stats_struct_has_a_field_for_every_count_of_the_store
    shm_mapped_blocks_move_both_ways_between_processes_byte_exact
    shm_cross_memory_blocks_move_both_ways_between_processes_byte_exact
    shm_killing_the_target_mid_transfer_fails_within_the_deadline
    shm_target_process_rejects_unregistered_ranges_and_forged_keys
    killed_writer_leaves_only_intact_blocks
    restart_keeps_the_disk_tier_byte_exact
    a_full_disk_is_a_typed_error_and_dram_keeps_serving
    fabric_tcp_blocks_move_both_ways_between_processes_byte_exact
    fabric_shm_blocks_move_both_ways_between_processes_byte_exact
    fabric_tcp_killing_the_target_mid_transfer_fails_fast_and_the_agent_moves_on
    fabric_shm_killing_the_target_mid_transfer_ends_by_the_deadline_and_the_agent_moves_on
    fabric_tcp_target_process_rejects_forged_descriptors_and_keeps_serving
    fabric_shm_target_process_rejects_forged_descriptors_and_keeps_serving
    large_batches_stripe_across_two_rails_byte_exact
    each_transfer_goes_over_the_first_link_that_reaches_its_memory
    a_request_no_single_link_can_move_is_refused_at_post_and_moves_nothing
    store::tests::keys_cross_the_boundary_unchanged
    chained_keys_match_pinned_vectors
    metrics_scraped_after_a_bench_count_the_bytes_it_moved
    etcd_agents_in_two_processes_find_each_other_and_transfer
    etcd_a_killed_process_loses_its_key_when_its_lease_expires
    etcd_a_hung_peer_fails_its_pending_transfer_when_its_key_vanishes
    etcd_unreachable_is_a_typed_error_and_the_side_channel_still_works
    etcd_malformed_values_under_the_prefix_are_typed_errors
    subscribers_decode_stored_moved_removed_and_cleared_blocks_with_their_medium
    kv_events::tests::a_move_and_a_clear_encode_as_the_bytes_vllm_sends
    auth::tests::a_replayed_client_proof_is_refused
    a_client_without_the_secret_reads_nothing
    after_cancel_returns_no_byte_lands_and_the_peer_is_cut_off
    after_wait_times_out_no_byte_lands_and_the_peer_is_cut_off
    dropping_a_raw_registration_cuts_its_transfers_off_at_once
    an_owner_dropping_a_registration_cuts_off_a_member_trickling_a_write_into_it
    a_stopped_writer_cannot_touch_a_dropped_registration
    a_hostile_lease_holder_fails_only_itself
    an_endpoint_with_a_full_backlog_fails_add_peer_by_the_deadline
    idle_connections_leave_the_thread_count_fixed
    idle_shm_connections_leave_the_thread_count_fixed
    threads_stay_fixed_from_a_few_peers_to_hundreds_over_tcp_and_shm
    many_lanes_share_the_pool_and_each_runs_its_jobs_in_order
    a_batch_passes_its_deadline_when_its_clock_does_and_no_sooner
    the_breaker_opens_after_failures_in_a_row_and_probes_one_at_a_time
    a_readers_pins_hold_its_slabs_until_they_are_dropped_or_released
    what_options_lists_parse_takes_back_and_lists_again
    an_eviction_frees_its_victims_unless_a_reader_pinned_one_meanwhile
    a_trickled_write_is_cut_off_at_the_request_timeout_from_its_first_byte
    headers_announcing_many_descriptors_commit_no_memory_before_the_bytes_arrive
    accepting_at_the_descriptor_limit_does_not_spin
    a_full_notification_queue_answers_the_sender_busy
    a_record_pointed_at_another_block_never_serves_it
    forged_and_replayed_messages_are_not_acted_upon
    fabric_tcp_target_process_refuses_an_agent_with_another_secret
    libfabric_is_mapped_only_where_the_fabric_transport_runs_and_keeps_the_signal_handlers
    every_corpus_replays_without_a_panic
    the_c_options_corpus_replays_without_a_panic
    soak_for_a_minute_checks_every_byte_and_leaks_nothing
    put_to_disk_skips_dram_and_reads_back_byte_exact_into_caller_memory
    a_lookup_answers_while_the_index_log_is_held
    a_second_open_of_a_directory_is_refused_until_the_first_closes
    s3_blocks_stored_by_one_store_are_read_byte_exact_by_another
    s3_objects_forged_by_another_writer_are_refused_and_counted
    s3_a_three_node_cluster_that_loses_a_node_mid_workload_keeps_serving
    s3_a_server_killed_under_load_fails_fast_opens_the_breaker_and_dram_keeps_serving
    blocks_offered_by_one_client_are_found_and_read_by_another
    a_corrupt_object_is_counted_deleted_and_never_served
    an_unreachable_store_opens_the_breaker_and_drops_offers_without_waiting
)
# A test renamed or removed must not leave its sentinel to fail at the end of a long run:
# each one names a test function in the sources.
for must in "${sentinels[@]}"; do
    grep -rqE --include='*.rs' "fn ${must##*::}\b" crates c-api bindings ||
        { echo "sentinel: no test function is named ${must##*::}" >&2; exit 1; }
done

if cargo fmt --version >/dev/null 2>&1; then
    log "cargo fmt --check"
    cargo fmt --all --check
else
    echo "skipping the format check: rustfmt is not installed"
fi
if cargo clippy --version >/dev/null 2>&1; then
    log "cargo clippy"
    cargo clippy --workspace --all-targets "${feature_args[@]}" -- -D warnings
else
    echo "skipping lints: clippy is not installed"
fi

log "cargo build --workspace --all-targets ${feature_args[*]}"
cargo build --workspace --all-targets "${feature_args[@]}"

log "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace -q "${feature_args[@]}"

log "cargo test --workspace"
mkdir -p target
set +e
cargo test --workspace "${feature_args[@]}" 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "tests failed (exit $status)" >&2
    exit "$status"
fi
passed=$(awk '/^test result: ok\./ { n += $4 } END { print n + 0 }' target/test-output.log)
for must in "${sentinels[@]}"; do
    grep -q "test .*$must \.\.\. ok" target/test-output.log || { echo "sentinel: $must did not run" >&2; exit 1; }
done
if [ "$passed" -lt 150 ]; then
    echo "sentinel: only $passed tests passed; expected at least 150" >&2
    exit 1
fi

disk
# The C ABI: C programs built with cc against an installed libkvferry, run, and run under valgrind.
log "C ABI tests (c-api/check.sh)"
bash c-api/check.sh

# The Python package (bindings/python): the abi3 wheel built by maturin and installed with pip into
# a fresh venv without torch, where the binding's tests run (torch tests skip, saying why); then
# every test again in target/venv, which has torch, where none may skip.
python_passed=0
# A command the next run_pytest runs pytest under (one run's choice; empty otherwise).
pytest_prefix=()
run_pytest() {
    local venv=$1 output=$2 tests=${3:-bindings/python/tests}
    set +e
    # -rsp: the summary names every skipped and passed test on a line of its own, which
    # require_passed reads (a test that prints puts its PASSED on a later line than its name).
    ${pytest_prefix:+"${pytest_prefix[@]}"} "$venv/bin/python" -m pytest -p no:cacheprovider -v -rsp "$tests" 2>&1 |
        tee "$output"
    local status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -ne 0 ]; then
        echo "Python tests failed in $venv (exit $status)" >&2
        exit "$status"
    fi
    python_passed=$((python_passed + $(grep -Eo '[0-9]+ passed' "$output" | tail -1 | grep -Eo '[0-9]+')))
}
# Fails unless each named pytest test passed in the log.
require_passed() {
    local log=$1 must
    shift
    for must in "$@"; do
        grep -q "^PASSED .*::$must" "$log" || { echo "sentinel: $must did not run" >&2; exit 1; }
    done
}
# A command prefix under which the dynamic loader cannot load libfabric, as on a machine without
# it: a private mount namespace where the library's file is covered by an empty one. Where
# namespaces are not permitted, KVFERRY_LIBFABRIC names a library that does not exist instead.
without_libfabric=()
set_without_libfabric() {
    local lib
    lib=$(realpath "$(ldconfig -p | awk '/libfabric\.so\.1 / { print $NF; exit }')")
    if unshare -m true 2>/dev/null; then
        # shellcheck disable=SC2016 # expanded by the inner shell
        without_libfabric=(unshare -m bash -c 'mount --bind /dev/null "$0" && exec "$@"' "$lib")
    else
        echo "mount namespaces are not permitted here: hiding libfabric with KVFERRY_LIBFABRIC" >&2
        without_libfabric=(env KVFERRY_LIBFABRIC=/nonexistent/libfabric.so.1)
    fi
}
# vLLM 0.33.0's wheel (about 340 MB), whose KVConnectorBase_V1 test_vllm_api.py reads from source
# without importing it (its GPU build does not import here); kept in target/ between runs.
vllm_033_wheel() {
    local dir=target/vllm-0.33.0
    if ! ls "$dir"/vllm-0.33.0-*.whl >/dev/null 2>&1; then
        log "downloading vLLM 0.33.0's wheel for the connector's API check"
        rm -rf "$dir"
        target/venv/bin/python -m pip download -q --no-deps vllm==0.33.0 -d "$dir"
    fi
    KVFERRY_VLLM_033_WHEEL=$(realpath "$dir"/vllm-0.33.0-*.whl)
    export KVFERRY_VLLM_033_WHEEL
}
python_tests() {
    disk
    log "Python package: build the wheel (scripts/python-env.sh)"
    bash scripts/python-env.sh
    vllm_033_wheel
    log "Python package: auditwheel names the wheel's manylinux policy"
    "target/venv/bin/python" -m pip install -q auditwheel
    target/venv/bin/auditwheel show target/wheels/kvferry-*.whl | tee target/auditwheel.log
    grep -q '"manylinux_2_34_x86_64"' target/auditwheel.log ||
        { echo "the wheel is not manylinux_2_34" >&2; exit 1; }
    log "Python package: the wheel in a fresh venv, on a machine where libfabric cannot be loaded"
    rm -rf target/wheel-venv
    python3 -m venv target/wheel-venv
    target/wheel-venv/bin/python -m pip install -q target/wheels/kvferry-*.whl numpy pytest
    set_without_libfabric
    "${without_libfabric[@]}" target/wheel-venv/bin/python -c 'import kvferry'
    pytest_prefix=("${without_libfabric[@]}")
    run_pytest target/wheel-venv target/pytest-wheel.log
    pytest_prefix=()
    grep -Eq 'SKIPPED .*no libfabric here' target/pytest-wheel.log ||
        { echo "sentinel: the fabric test did not skip with the typed reason" >&2; exit 1; }
    require_passed target/pytest-wheel.log \
        test_a_missing_libfabric_is_reported_unavailable_not_a_load_failure \
        test_bench_moves_bytes_over_the_embedded_loopback \
        test_the_console_script_is_installed_with_the_package
    log "Python package: the source distribution builds a wheel that installs"
    rm -rf target/sdist target/sdist-wheel target/sdist-venv
    target/venv/bin/maturin sdist -m bindings/python/Cargo.toml -o target/sdist
    # A target directory of its own (cargo would take target/'s artifacts as fresh), and the dev
    # profile, which builds faster: this proves the sdist holds what the build needs.
    rm -rf target/sdist-build
    CARGO_TARGET_DIR="$PWD/target/sdist-build" MATURIN_PEP517_ARGS="--profile dev" \
        target/venv/bin/python -m pip wheel -q --no-cache-dir --no-deps -w target/sdist-wheel \
        target/sdist/kvferry-*.tar.gz
    rm -rf target/sdist-build
    python3 -m venv target/sdist-venv
    target/sdist-venv/bin/python -m pip install -q target/sdist-wheel/kvferry-*.whl
    target/sdist-venv/bin/kvferry info --json >/dev/null
    # The wheel leaves KV events out (libzmq is outside the manylinux policy): the venv with torch
    # and vLLM gets a build with them, so that their test runs there rather than skipping.
    log "Python package: a build with KV events (--features kv-events) into target/venv"
    rm -rf target/wheels-kv-events
    # The wheel's own features (pyproject.toml: `--features` replaces them) and kv-events, tagged
    # for this machine (`linux`): libzmq brings a libstdc++ newer than the wheel's policy.
    wheel_features=$(python3 -c 'import tomllib; print(",".join(tomllib.load(open("bindings/python/pyproject.toml", "rb"))["tool"]["maturin"]["features"]))')
    target/venv/bin/maturin build --release -m bindings/python/Cargo.toml --features "$wheel_features,kv-events" \
        --compatibility linux -o target/wheels-kv-events
    target/venv/bin/python -m pip install -q --force-reinstall --no-deps target/wheels-kv-events/kvferry-*.whl
    log "Python package: every test, with torch"
    KVFERRY_REQUIRE_TORCH=1 run_pytest target/venv target/pytest-torch.log
    if grep -Eq '[0-9]+ skipped' target/pytest-torch.log; then
        echo "Python tests were skipped where torch is installed" >&2
        exit 1
    fi
    require_passed target/pytest-torch.log \
        test_torch_tensors_move_both_ways_byte_exact \
        test_blocks_move_both_ways_between_processes_byte_exact \
        test_a_killed_peer_fails_the_transfer_fast \
        test_waiting_for_notifications_releases_the_gil \
        test_a_small_dram_serves_blocks_back_from_disk \
        test_chained_keys_match_the_rust_vectors \
        test_blocks_move_between_tensor_parallel_sizes_by_head \
        test_a_peer_without_our_secret_is_refused \
        test_side_channel_serves_only_engines_that_prove_the_secret \
        test_a_tensor_given_other_storage_is_revoked_and_new_tensors_stay_untouched \
        test_a_deregistration_cuts_off_a_read_from_a_stopped_peer_and_lands_nothing \
        test_blocks_go_straight_to_disk_and_back_into_caller_memory \
        test_a_disk_directory_is_locked_against_a_second_process \
        test_a_store_killed_with_sigkill_leaves_its_blocks_listed_and_no_lock \
        test_the_factory_loads_the_tier_by_module_path \
        test_stores_lookups_loads_and_events_round_trip_byte_exact \
        test_a_flipped_byte_in_the_block_file_fails_the_load_and_serves_nothing \
        test_a_store_larger_than_the_disk_fails_and_nothing_is_served \
        test_blocks_on_disk_are_found_after_the_tier_is_recreated \
        test_routers_decode_a_put_a_move_a_clear_and_a_replay \
        test_the_connector_implements_the_installed_vllm_base \
        test_the_connector_implements_the_vllm_0_33_base \
        test_vllm_sums_the_ranks_logs_and_exports_the_counters \
        test_reports_hold_what_the_agent_moved_since_the_last_report \
        test_blocks_stored_by_one_store_are_read_by_another_with_an_empty_dram \
        test_a_flipped_byte_in_an_object_fails_the_get_and_serves_nothing \
        test_an_unreachable_store_answers_lookups_as_misses_and_keeps_dram_serving
}
python_tests

# The vLLM connector end to end: real vLLM (CPU build) engines in their own processes.
vllm_tests() {
    disk
    log "vLLM connector: offload, P/D and failure tests on vLLM's CPU build"
    KVFERRY_REQUIRE_VLLM=1 run_pytest target/venv target/pytest-vllm.log bindings/python/tests_vllm
    require_passed target/pytest-vllm.log \
        test_offload_round_trip_through_dram \
        test_offload_round_trip_of_a_model_with_a_sliding_window_group \
        test_pd_moves_every_kv_cache_group \
        test_offload_round_trip_through_disk \
        test_an_engine_killed_with_sigkill_restarts_on_its_disk_and_serves_it \
        test_decode_through_proxy_equals_one_engine \
        test_lease_ends_and_frees_unread_prefill_blocks \
        test_a_decode_request_aborted_mid_pull_frees_its_blocks_at_once \
        test_prefill_killed_before_decode_reads \
        test_colocated_engines_on_one_cpu_serve_pd_without_waiting_for_the_lease \
        test_a_second_engine_hits_every_block_the_first_stored_in_s3 \
        test_a_shared_directory_serves_a_second_engine_and_flipped_bytes_are_recomputed \
        test_the_s3_server_killed_mid_run_leaves_every_request_served
    # The two-host test skips, saying why, where network namespaces cannot be made; where they can,
    # it must have passed.
    if ip netns add "kvf-probe-$$" 2>/dev/null; then
        ip netns del "kvf-probe-$$"
        require_passed target/pytest-vllm.log test_pd_between_two_network_namespaces_over_tcp
    fi
}
vllm_tests

# The etcd tests skip, saying why, where etcd is missing, and a skipped test still reports ok:
# etcd was installed above, so make sure the binary they start is really there.
etcd_binary="${KVFERRY_ETCD:-/usr/bin/etcd}"
[ -x "$etcd_binary" ] || { echo "sentinel: $etcd_binary is missing, so the etcd tests skipped" >&2; exit 1; }

echo "$((passed + python_passed)) passed, 0 failed"
