"""``offsite cloud prepare``'s security options: the job id, update envelopes, secure aggregation,
differential privacy (written to ``job.json``'s ``job_id`` and ``security``), and signing the
bundle with the coordinator's key. See :class:`offsite.cloud.fed_job.SecurityConfig`."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from offsite.protocol.bundle_signing import sign_bundle
from offsite.protocol.ids import DP_MODES
from offsite.protocol.keys import CoordinatorKeys

from .fed_job import SecurityConfig


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The security group of ``cloud prepare``; defaults are :class:`SecurityConfig`'s (all off)."""
    sec = SecurityConfig()
    group = parser.add_argument_group("security (job.json 'security'; docs/security.md)")
    _add_identity_arguments(group)
    _add_envelope_arguments(group)
    _add_secagg_arguments(group, sec)
    _add_dp_arguments(group, sec)


def _add_identity_arguments(group) -> None:
    """``--job-id``, ``--keys``, ``--registry``."""
    group.add_argument(
        "--job-id",
        default=None,
        help="the job's id, bound into every envelope and secure-aggregation session (default: a fresh uuid4)",
    )
    group.add_argument(
        "--keys",
        type=Path,
        default=None,
        help="the coordinator's key directory (`offsite cloud keys --out DIR`): "
        "signs the bundle (manifest.sig) and opens envelopes",
    )
    group.add_argument(
        "--registry", type=Path, default=None, help="sender registry JSON (`offsite cloud enroll --registry FILE`)"
    )


def _add_envelope_arguments(group) -> None:
    """``--envelopes`` and the limits on a sealed update."""
    group.add_argument(
        "--envelopes",
        action="store_true",
        help="clients seal their updates to the coordinator and sign them (needs --keys and --registry)",
    )
    group.add_argument(
        "--max-update-norm",
        type=float,
        default=None,
        help="refuse an update whose L2 distance from the global adapter is larger (envelopes)",
    )
    group.add_argument(
        "--max-payload-bytes",
        type=int,
        default=None,
        help="refuse a larger sealed update (default: the adapter's size plus a margin)",
    )


def _add_secagg_arguments(group, sec: SecurityConfig) -> None:
    """``--secure-aggregation`` and ``--secagg-*``."""
    group.add_argument(
        "--secure-aggregation", action="store_true", help="pairwise-masked sum: the coordinator sees only the aggregate"
    )
    group.add_argument(
        "--secagg-clip-range",
        type=float,
        default=sec.secagg_clip_range,
        help="each coordinate of a client's delta is clipped to [-C, C] before quantising "
        f"(default {sec.secagg_clip_range:g})",
    )
    group.add_argument(
        "--secagg-ring-bits",
        type=int,
        choices=(32, 64),
        default=sec.secagg_ring_bits,
        help=f"ring Z_2^k (default {sec.secagg_ring_bits})",
    )
    group.add_argument(
        "--secagg-threshold",
        type=int,
        default=sec.secagg_threshold,
        help="least clients whose shares unmask the sum; each round uses at least a majority of its nodes "
        f"(default {sec.secagg_threshold})",
    )


def _add_dp_arguments(group, sec: SecurityConfig) -> None:
    """Differential privacy: ``--dp-*``."""
    group.add_argument(
        "--dp-clip",
        type=float,
        default=None,
        help="differential privacy: clip each client's delta to this L2 norm and add Gaussian noise",
    )
    group.add_argument(
        "--dp-noise",
        type=float,
        default=sec.dp_noise_multiplier,
        help=f"DP noise multiplier z (default {sec.dp_noise_multiplier:g})",
    )
    group.add_argument(
        "--dp-mode",
        choices=DP_MODES,
        default=sec.dp_mode,
        help="local: z on every update; distributed: z on the sum of >= --min-replies updates "
        "(needs --secure-aggregation)",
    )
    group.add_argument(
        "--dp-delta",
        type=float,
        default=sec.dp_delta,
        help=f"delta at which epsilon is reported (default {sec.dp_delta:g})",
    )


def security_from_args(args: argparse.Namespace) -> dict:
    """``{"job_id": ..., "security": SecurityConfig}`` for :class:`FedJobConfig` (validated there).

    A ``--keys`` directory is loaded here, so a bad one fails before any distillation."""
    keys = getattr(args, "keys", None)
    if keys is not None:
        CoordinatorKeys.load(keys)
    registry = getattr(args, "registry", None)
    security = SecurityConfig(
        envelopes=getattr(args, "envelopes", False),
        keys_dir=str(keys.resolve()) if keys is not None else None,
        registry=str(registry.resolve()) if registry is not None else None,
        max_update_norm=getattr(args, "max_update_norm", None),
        max_payload_bytes=getattr(args, "max_payload_bytes", None),
        secure_aggregation=getattr(args, "secure_aggregation", False),
        secagg_clip_range=getattr(args, "secagg_clip_range", SecurityConfig.secagg_clip_range),
        secagg_ring_bits=getattr(args, "secagg_ring_bits", SecurityConfig.secagg_ring_bits),
        secagg_threshold=getattr(args, "secagg_threshold", SecurityConfig.secagg_threshold),
        dp_clip_norm=getattr(args, "dp_clip", None),
        dp_noise_multiplier=getattr(args, "dp_noise", SecurityConfig.dp_noise_multiplier),
        dp_mode=getattr(args, "dp_mode", SecurityConfig.dp_mode),
        dp_delta=getattr(args, "dp_delta", SecurityConfig.dp_delta),
    )
    return {"job_id": getattr(args, "job_id", None) or uuid.uuid4().hex, "security": security}


def sign_prepared_bundle(job, bundle_dir: Path) -> Path | None:
    """Sign the bundle with the job's coordinator key (``security.keys_dir``), if it names one."""
    if job.security.keys_dir is None:
        return None
    return sign_bundle(bundle_dir, CoordinatorKeys.load(job.security.keys_dir))


def security_summary(job) -> str:
    """One line for ``cloud prepare``'s output."""
    sec = job.security
    parts = [f"job id {job.job_id}"]
    if sec.envelopes:
        parts.append(
            f"envelopes (registry {sec.registry}"
            f"{'' if Path(sec.registry).is_file() else ': not there yet, enrol senders before the run'})"
        )
    if sec.secure_aggregation:
        parts.append(f"secure aggregation (clip range {sec.secagg_clip_range:g}, {sec.secagg_ring_bits}-bit ring)")
    if sec.dp:
        parts.append(
            f"DP {sec.dp_mode} (clip {sec.dp_clip_norm:g}, noise multiplier {sec.dp_noise_multiplier:g}, "
            f"delta {sec.dp_delta:g})"
        )
    return "security: " + ", ".join(parts)
