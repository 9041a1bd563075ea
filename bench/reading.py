"""A short reading of the figures, in sentences, for RESULTS.md.

Where a goal is not met, the sentence names the largest phases of the matching profile
and what would shrink each (``FIXES``: a suggestion per phase, from reading the code).
"""

from __future__ import annotations

from bench.profiling import Share
from bench.report import Results

FIXES: dict[str, str] = {
    "SQL page ledger": (
        "the pre-write sends every claimed key as JSON (a rebuild of Redis needs them): a"
        " compact encoding, or COPY on PostgreSQL, would send fewer bytes"
    ),
    "validate records": (
        "plain dicts keyed by a field already take a fast path; key functions and"
        " max_record_bytes keep the per-record path"
    ),
    "Redis claim_page": (
        "claim_page is one Lua call per page with its keys as one JSON argument and two"
        " hash commands per 1,000 keys; what remains is the server's per-key work (about"
        " 1 µs a key) and a single Redis server's one core: shard flows over servers"
    ),
    "Dagster: check evaluation per run": (
        "Dagster has no batch write for check evaluations: one evaluation per flow per tick"
        " (the newest run's status) instead of one per run"
    ),
    "Dagster: add_run_tags per run": (
        "Dagster has no batch tag write: leave the status of bulk runs to the ledger, or tag"
        " them over more ticks"
    ),
    "Dagster: event log writes": (
        "fewer, larger steps (a larger default pages_per_step: every step writes about eight"
        " events, each a connect + insert + commit on a SQLite instance)"
    ),
    "ours: process_pages": "a faster hot path (above)",
}


def _top(shares: list[Share], n: int = 3) -> list[Share]:
    ranked = sorted(shares, key=lambda s: s.share, reverse=True)
    return [s for s in ranked[:n] if s.share > 0.05]


def _where(shares: list[Share]) -> str:
    return ", ".join(f"{s.label} {s.share:.0%}" for s in _top(shares))


def _fixes(shares: list[Share]) -> str:
    found = [fix for s in _top(shares) for key, fix in FIXES.items() if s.label.startswith(key)]
    found = list(dict.fromkeys(found))  # two phases may share a fix
    return ("What would close the gap: " + "; ".join(found) + ".") if found else ""


def reading(results: Results) -> list[str]:
    """The bullets of the Reading section."""
    f, ctx, prof = results.figures, results.context, results.profiles
    out: list[str] = []
    machine = ctx.get("machine", {})
    load, cores = machine.get("load_average_at_start", [0])[0], machine.get("cores") or 1
    if load > cores / 2:
        out.append(
            f"The machine was busy (load average {load} on {cores} cores at the start,"
            f" {ctx.get('load_average_at_end')} at the end): every timing is pessimistic,"
            " round-trip-bound ones (the baselines, the finalizer, multiprocess steps) most."
        )
    if "accounting_records_per_s" in f:
        acc = f["accounting_records_per_s"]
        line = (
            f"Hot path: {acc:,.0f} records/s through process_pages"
            f" ({results.verdict('accounting_records_per_s')} against 250,000), which is"
            f" {f['accounting_vs_roundtrip_ratio']:.1f}x one Redis round trip per record"
            f" ({f['baseline_per_record_roundtrip_records_per_s']:,.0f}/s) and"
            f" {f['accounting_vs_sql_ratio']:.1f}x one SQL UPDATE per job"
            f" ({f['baseline_sql_row_update_records_per_s']:,.0f}/s). The Redis server does"
            f" {f['redis_server_ops_per_s']:,.0f} pipelined INCR/s"
            f" ({results.methods.get('redis_server_ops_per_s', '')}): the hot path moves"
            f" {acc / f['redis_server_ops_per_s']:.0%} of that many records."
        )
        if "hot_path" in prof:
            line += f" Page time: {_where(prof['hot_path'])}."
            if results.verdict("accounting_records_per_s") == "NOT MET":
                line += " " + _fixes(prof["hot_path"])
        out.append(line)
    if "scaling_exponent" in f:
        out.append(
            f"Scaling: time grows as records^{f['scaling_exponent']:.2f} over"
            f" {', '.join(f'{n:,}' for n in results.sizes.hot_path_records)} records"
            f" ({results.verdict('scaling_exponent')}; 1.0 is linear; short runs are noisiest)."
        )
    if "e2e_records_per_s_in_process" in f:
        line = (
            f"End to end ({results.sizes.e2e_records:,} records, launch to finalized row):"
            f" {f['e2e_records_per_s_in_process']:,.0f} records/s in-process"
            f" ({results.verdict('e2e_records_per_s_in_process')} against 50,000), Dagster's"
            f" share of the wall time {f['dagster_overhead_share']:.0%}; multiprocess"
            f" {f['e2e_records_per_s_multiprocess']:,.0f} records/s, Dagster's share about"
            f" {f['dagster_overhead_share_multiprocess']:.0%} (step process start-up, event"
            " writes, pickled chunks). Our own page work alone runs at"
            f" {f['e2e_process_page_records_per_s']:,.0f} records/s inside the run."
        )
        if "e2e_in_process" in prof:
            line += f" In-process run time: {_where(prof['e2e_in_process'])}."
            if results.verdict("e2e_records_per_s_in_process") == "NOT MET":
                line += " " + _fixes(prof["e2e_in_process"])
        out.append(line)
    if "peak_rss_mb_e2e" in f:
        flat = results.verdict("peak_rss_growth_ratio")
        out.append(
            f"Memory: peak RSS {f['peak_rss_mb_e2e_small']:,.0f} MB at"
            f" {results.sizes.e2e_small_records:,} records and {f['peak_rss_mb_e2e']:,.0f} MB at"
            f" {results.sizes.e2e_records:,} in-process (x{f['peak_rss_growth_ratio']:.2f}:"
            f" flat goal {flat}); multiprocess {f['peak_rss_mb_e2e_multiprocess_small']:,.0f}"
            f" -> {f['peak_rss_mb_e2e_multiprocess']:,.0f} MB (sum of RSS over the process"
            " tree, shared pages counted per process)."
            + (
                " In-process (execute_in_process, as flowctl run does), Dagster captures every"
                " step output in memory for the result object, so chunks that carry records"
                " (sequential sources) stay until the run ends. What would close the gap:"
                " chunks of page references (as JSON Lines files now have) for more sources,"
                " or flowctl run through execute_job on a reconstructable job."
                if flat == "NOT MET"
                else ""
            )
        )
    if "finalizer_tick_s" in f:
        line = (
            f"Finalizer: {results.sizes.finalizer_runs:,} ready runs, the first tick finalized"
            f" {f['finalizer_runs_per_tick']:,.0f} (final rows written) and published"
            f" {f['finalizer_runs_published_first_tick']:,.0f} to Dagster; the longest tick"
            f" took {f['finalizer_tick_s']:.1f} s ({results.verdict('finalizer_tick_s')}"
            " against < 10). Every run is final after"
            f" {f['finalizer_ticks_to_finalize_all']:,.0f} ticks"
            f" ({results.verdict('finalizer_ticks_to_finalize_all')} against 2) and published"
            f" (materialization, check, run tag) after {f['finalizer_ticks_to_publish_all']:,.0f}"
            " ticks"
            + (
                f" (projected past the {results.sizes.finalizer_max_ticks} timed ones)"
                if f["finalizer_ticks_to_publish_all"] > results.sizes.finalizer_max_ticks
                else ""
            )
            + f"; {f['finalizer_ms_per_run']:.2f} ms of tick time per run in all. With"
            f" {results.sizes.finalizer_history_rows:,} finished rows of history a run costs"
            f" x{f['finalizer_history_slowdown']:.2f} what it costs without"
            f" ({results.verdict('finalizer_history_slowdown')} against 1.2)."
        )
        if "finalizer_tick" in prof:
            line += f" Tick time: {_where(prof['finalizer_tick'])}."
            if "NOT MET" in (
                results.verdict("finalizer_tick_s"),
                results.verdict("finalizer_runs_per_tick"),
            ):
                line += " " + _fixes(prof["finalizer_tick"])
        out.append(line)
    if "redis_bytes_per_record" in f:
        out.append(
            f"Redis holds {f['redis_bytes_per_record']:.0f} bytes per record while a run is open"
            f" ({results.verdict('redis_bytes_per_record')} against 100; nearly all of it the"
            f" dedup hash) and {f['redis_keys_after_finalize']:.0f} run keys after"
            " finalization."
        )
    return out
