"""The per-device metric families: one table of definitions, and a fast text writer.

prometheus_client builds a Sample object per value and formats each one
generically, about 12 µs a sample; 1,000 devices make some 90,000 samples, and
a scrape took over a second.  :func:`write` puts the same families straight
into text format 0.0.4 or OpenMetrics 1.0.0, each device's label string built
once per scrape.  :func:`families` gives them as prometheus_client metric
families (for the collector API and the tests, which check both give the same).
Both read the table below, so names, types, help and units cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from blockd.block.stats import DEFAULT_LATENCY_BOUNDARIES_NS, KindStats
from blockd.monitoring.samples import IO_STATUSES, DeviceSample

__all__ = ["IO_STATUSES", "families", "write"]

_NS = 1e9

Value = int | float | None  # None: the device has no such sample


def _float(value: float) -> str:
    """A float as the exposition formats write it (``+Inf``, ``NaN``, else shortest repr)."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _seconds(ns: int) -> float:
    return ns / _NS


# (name, type, help, unit, value); the help names the query-blockstats field.
SCALARS: tuple[tuple[str, str, str, str, Callable[[DeviceSample], Value]], ...] = (
    ("blockd_device_read_bytes_total", "counter",
     "Bytes read by successful requests (rd_bytes).", "bytes",
     lambda d: d.stats.read.nbytes),
    ("blockd_device_written_bytes_total", "counter",
     "Bytes written by successful requests (wr_bytes).", "bytes",
     lambda d: d.stats.write.nbytes),
    ("blockd_device_discarded_bytes_total", "counter",
     "Bytes discarded by successful requests (unmap_bytes).", "bytes",
     lambda d: d.stats.unmap.nbytes),
    ("blockd_device_reads_completed_total", "counter",
     "Read requests completed successfully (rd_operations).", "",
     lambda d: d.stats.read.operations),
    ("blockd_device_writes_completed_total", "counter",
     "Write requests completed successfully (wr_operations).", "",
     lambda d: d.stats.write.operations),
    ("blockd_device_flush_requests_total", "counter",
     "Flush requests completed successfully (flush_operations).", "",
     lambda d: d.stats.flush.operations),
    ("blockd_device_discards_completed_total", "counter",
     "Discard requests completed successfully (unmap_operations).", "",
     lambda d: d.stats.unmap.operations),
    ("blockd_device_read_time_seconds_total", "counter",
     "Total latency of read requests (rd_total_time_ns).", "seconds",
     lambda d: _seconds(d.stats.read.total_time_ns)),
    ("blockd_device_write_time_seconds_total", "counter",
     "Total latency of write requests (wr_total_time_ns).", "seconds",
     lambda d: _seconds(d.stats.write.total_time_ns)),
    ("blockd_device_flush_time_seconds_total", "counter",
     "Total latency of flush requests (flush_total_time_ns).", "seconds",
     lambda d: _seconds(d.stats.flush.total_time_ns)),
    ("blockd_device_discard_time_seconds_total", "counter",
     "Total latency of discard requests (unmap_total_time_ns).", "seconds",
     lambda d: _seconds(d.stats.unmap.total_time_ns)),
    ("blockd_device_io_now", "gauge", "Requests in flight.", "",
     lambda d: d.stats.in_flight),
    ("blockd_device_write_highest_offset_bytes", "gauge",
     "End of the highest write on the medium (wr_highest_offset).", "bytes",
     lambda d: d.wr_highest_offset),
    ("blockd_device_idle_seconds", "gauge",
     "Time since the last accounted request (idle_time_ns).", "seconds",
     lambda d: None if d.stats.idle_ns is None else _seconds(d.stats.idle_ns)),
    ("blockd_device_tray_open", "gauge", "Whether the tray is open (devices with a tray).", "",
     lambda d: int(d.tray_open) if d.has_tray else None),
    ("blockd_device_locked", "gauge", "Whether the medium is locked in.", "",
     lambda d: int(d.locked)),
    ("blockd_device_medium_inserted", "gauge", "Whether a medium is inserted.", "",
     lambda d: int(d.medium_inserted)),
    ("blockd_device_removable", "gauge", "Whether the device has removable media.", "",
     lambda d: int(d.removable)),
    ("blockd_device_size_bytes", "gauge", "Size of the inserted medium.", "bytes",
     lambda d: d.size),
)

# Requests of one kind, by the ``operation`` label.
OPERATIONS: tuple[tuple[str, Callable[[DeviceSample], KindStats]], ...] = (
    ("read", lambda d: d.stats.read), ("write", lambda d: d.stats.write),
    ("flush", lambda d: d.stats.flush), ("discard", lambda d: d.stats.unmap),
)
PER_OPERATION: tuple[tuple[str, str, Callable[[KindStats], int]], ...] = (
    ("blockd_device_failed_operations_total",
     "Requests that completed with an error (failed_*_operations).", lambda k: k.failed),
    ("blockd_device_invalid_operations_total",
     "Requests rejected before submission (invalid_*_operations).", lambda k: k.invalid),
)
HISTOGRAMS: tuple[tuple[str, str, Callable[[DeviceSample], KindStats]], ...] = (
    ("blockd_device_read_latency_seconds", "Latency of completed read requests.",
     lambda d: d.stats.read),
    ("blockd_device_write_latency_seconds", "Latency of completed write requests.",
     lambda d: d.stats.write),
    ("blockd_device_flush_latency_seconds", "Latency of completed flush requests.",
     lambda d: d.stats.flush),
)
IO_STATUS = ("blockd_device_io_status", "I/O status (set by the stop and enospc error policies).")
INFO = ("blockd_device", "The device and its medium.")
INFO_KEYS = ("driver", "filename", "serial", "vendor", "product", "revision", "wwn")
# blockd-scsi-command's counts: (name, help, label, the sample's (value, count) pairs).
LABELLED: tuple[tuple[str, str, str, Callable[[DeviceSample], tuple[tuple[str, int], ...]]],
                ...] = (
    ("blockd_device_scsi_commands_total",
     "Raw SCSI commands sent with blockd-scsi-command, by operation code.", "opcode",
     lambda d: d.scsi_commands),
    ("blockd_device_scsi_check_conditions_total",
     "Raw SCSI commands answered with CHECK CONDITION, by sense key.", "sense_key",
     lambda d: d.scsi_check_conditions),
)

_DEFAULT_LE = tuple(_float(b / _NS) for b in DEFAULT_LATENCY_BOUNDARIES_NS)


def buckets(kind: KindStats) -> tuple[Sequence[str], Sequence[int]]:
    """Bucket bounds as ``le`` strings and per-bin counts (one more than bounds).

    The histogram set with block-latency-histogram-set if there is one, else
    the default one (50 µs to 10 s).
    """
    if kind.histogram is not None:
        return [_float(b / _NS) for b in kind.histogram.boundaries], kind.histogram.bins
    if kind.default_histogram is None:  # a snapshot made elsewhere: empty defaults
        return _DEFAULT_LE, (0,) * (len(_DEFAULT_LE) + 1)
    return _DEFAULT_LE, kind.default_histogram.bins


def _cumulative(bins: Sequence[int]) -> list[int]:
    out, total = [], 0
    for count in bins:
        total += count
        out.append(total)
    return out


# -- prometheus_client families --------------------------------------------------------


def families(devices: Sequence[DeviceSample]) -> Iterator[Metric]:
    """The per-device families as prometheus_client metric families."""
    labels = ("device", "node")
    for name, kind, doc, unit, value in SCALARS:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = cls(name, doc, labels=labels, unit=unit)
        for d in devices:
            v = value(d)
            if v is not None:
                family.add_metric([d.id, d.node], v)
        yield family
    for name, doc, field in PER_OPERATION:
        counter = CounterMetricFamily(name, doc, labels=(*labels, "operation"))
        for d in devices:
            for op, get_kind in OPERATIONS:
                counter.add_metric([d.id, d.node, op], field(get_kind(d)))
        yield counter
    for name, doc, label, pairs_of in LABELLED:
        counter = CounterMetricFamily(name, doc, labels=(*labels, label))
        for d in devices:
            for label_value, count in pairs_of(d):
                counter.add_metric([d.id, d.node, label_value], count)
        yield counter
    for name, doc, get_kind in HISTOGRAMS:
        hist = HistogramMetricFamily(name, doc, labels=labels, unit="seconds")
        for d in devices:
            kind_stats = get_kind(d)
            les, bins = buckets(kind_stats)
            totals = _cumulative(bins)
            pairs = [*zip(les, totals, strict=False), ("+Inf", totals[-1])]
            hist.add_metric([d.id, d.node], pairs, _seconds(kind_stats.total_time_ns))
        yield hist
    states = StateSetMetricFamily(IO_STATUS[0], IO_STATUS[1], labels=labels)
    for d in devices:
        states.add_metric([d.id, d.node], {s: d.iostatus == s for s in IO_STATUSES})
    yield states
    info = InfoMetricFamily(INFO[0], INFO[1], labels=labels)
    for d in devices:
        info.add_metric([d.id, d.node], {k: getattr(d, k) for k in INFO_KEYS})
    yield info


# -- direct text ----------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else _float(value)


def _header(out: list[str], name: str, kind: str, doc: str, unit: str, openmetrics: bool) -> None:
    """A family's HELP/TYPE(/UNIT) lines; ``name`` is the sample name (``_total``, ``_info``)."""
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    if openmetrics:
        family = name.removesuffix("_total") if kind == "counter" else name
        out.append(f"# HELP {family} {doc}\n# TYPE {family} {kind}\n")
        if unit:
            out.append(f"# UNIT {family} {unit}\n")
    else:
        shown = "gauge" if kind in ("info", "stateset") else kind
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {shown}\n")


def _headers(openmetrics: bool) -> list[str]:
    """Each family's header lines as one string, in the order :func:`_chunks` fills them."""
    specs = [(name, kind, doc, unit) for name, kind, doc, unit, _ in SCALARS]
    specs += [(name, "counter", doc, "") for name, doc, _ in PER_OPERATION]
    specs += [(name, "counter", doc, "") for name, doc, _, _ in LABELLED]
    specs += [(name, "histogram", doc, "seconds") for name, doc, _ in HISTOGRAMS]
    specs.append((IO_STATUS[0], "stateset", IO_STATUS[1], ""))
    specs.append((INFO[0] if openmetrics else f"{INFO[0]}_info", "info", INFO[1], ""))
    headers = []
    for name, kind, doc, unit in specs:
        lines: list[str] = []
        _header(lines, name, kind, doc, unit, openmetrics)
        headers.append("".join(lines))
    return headers


_HEADERS = {False: _headers(False), True: _headers(True)}
_IDLE = next(i for i, scalar in enumerate(SCALARS) if scalar[0] == "blockd_device_idle_seconds")


def _chunks(d: DeviceSample) -> list[str]:
    """One device's sample lines, one string per family (the same in both formats)."""
    lbl = f'device="{_escape(d.id)}",node="{_escape(d.node)}"'
    out: list[str] = []
    for name, _, _, _, value in SCALARS:
        v = value(d)
        out.append("" if v is None else f"{name}{{{lbl}}} {_number(v)}\n")
    for name, _, field in PER_OPERATION:
        out.append("".join(f'{name}{{{lbl},operation="{op}"}} {field(get_kind(d))}\n'
                           for op, get_kind in OPERATIONS))
    for name, _, label, pairs_of in LABELLED:
        out.append("".join(f'{name}{{{lbl},{label}="{_escape(value)}"}} {count}\n'
                           for value, count in pairs_of(d)))
    for name, _, get_kind in HISTOGRAMS:
        kind_stats = get_kind(d)
        les, bins = buckets(kind_stats)
        totals = _cumulative(bins)
        lines = [f'{name}_bucket{{{lbl},le="{le}"}} {n}\n'
                 for le, n in zip(les, totals, strict=False)]
        lines.append(f'{name}_bucket{{{lbl},le="+Inf"}} {totals[-1]}\n'
                     f"{name}_count{{{lbl}}} {totals[-1]}\n"
                     f"{name}_sum{{{lbl}}} {_number(_seconds(kind_stats.total_time_ns))}\n")
        out.append("".join(lines))
    status = IO_STATUS[0]
    out.append("".join(f'{status}{{{lbl},{status}="{s}"}} {int(d.iostatus == s)}\n'
                       for s in IO_STATUSES))
    extra = "".join(f',{k}="{_escape(getattr(d, k))}"' for k in INFO_KEYS)
    out.append(f"{INFO[0]}_info{{{lbl}{extra}}} 1\n")
    return out


def _unchanged_key(d: DeviceSample) -> tuple[object, ...]:
    """Everything a device's lines show except its idle time (which moves on every scrape)."""
    s = d.stats
    return (d.id, d.node, d.driver, d.filename, d.serial, d.vendor, d.product, d.revision,
            d.wwn, d.removable, d.has_tray, d.tray_open, d.locked, d.size, d.wr_highest_offset,
            d.iostatus, s.read, s.write, s.flush, s.unmap, s.in_flight, s.idle_ns is None,
            d.scsi_commands, d.scsi_check_conditions)


class TextWriter:
    """Writes the per-device families, re-formatting only devices whose numbers moved.

    Most devices of a large daemon are idle between two scrapes; their lines
    are kept from the previous scrape (keyed by every number they show, so a
    kept line is never stale).  Only the idle time is formatted every time.
    Not thread-safe: one writer per thread, or a lock around :meth:`write`.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[object, ...], list[str]]] = {}

    def write(self, devices: Sequence[DeviceSample], *, openmetrics: bool) -> str:
        """Text format 0.0.4, or OpenMetrics without the final ``# EOF``."""
        cache, fresh = self._cache, {}
        rows: list[list[str]] = []
        for d in devices:
            key = _unchanged_key(d)
            hit = cache.get(d.id)
            chunks = hit[1] if hit is not None and hit[0] == key else _chunks(d)
            fresh[d.id] = (key, chunks)
            if d.stats.idle_ns is not None:
                chunks = list(chunks)
                chunks[_IDLE] = _chunks_idle(d)
            rows.append(chunks)
        self._cache = fresh  # forget removed devices
        out: list[str] = []
        for i, header in enumerate(_HEADERS[openmetrics]):
            out.append(header)
            out.extend(row[i] for row in rows)
        return "".join(out)


def _chunks_idle(d: DeviceSample) -> str:
    name, _, _, _, value = SCALARS[_IDLE]
    v = value(d)
    assert v is not None
    return f'{name}{{device="{_escape(d.id)}",node="{_escape(d.node)}"}} {_number(v)}\n'


def write(devices: Sequence[DeviceSample], *, openmetrics: bool) -> str:
    """The per-device families in text format 0.0.4, or OpenMetrics (without ``# EOF``)."""
    return TextWriter().write(devices, openmetrics=openmetrics)
