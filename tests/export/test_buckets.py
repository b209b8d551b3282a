from __future__ import annotations

import pytest

from export.buckets import BucketSpec, parse_buckets
from passes.errors import DitmergeError


def test_bare_ratios_split_the_range_evenly_noisiest_first():
    assert parse_buckets("0.5,0.4,0.3") == [BucketSpec(667, 999, 0.5), BucketSpec(334, 666, 0.4), BucketSpec(0, 333, 0.3)]
    assert parse_buckets("0") == [BucketSpec(0, 999, 0.0)]
    assert parse_buckets("0.2,0.1", num_train_timesteps=10) == [BucketSpec(5, 9, 0.2), BucketSpec(0, 4, 0.1)]


def test_explicit_ranges_in_any_order():
    assert parse_buckets("0-499:0.3, 999-500:0.5") == [BucketSpec(500, 999, 0.5), BucketSpec(0, 499, 0.3)]


@pytest.mark.parametrize("spec,message", [
    ("999-500:0.5,450-0:0.3", "timesteps 451..499 fall in no bucket"),
    ("999-400:0.5,500-0:0.3", "overlap"),
    ("998-0:0.5", "must cover timesteps 0..999"),
    ("999-0:0.5,1200-1000:0.1", "must cover timesteps 0..999"),
    ("0.5,999-0:0.3", "mixes ranges and bare ratios"),
    ("0.5,fast", "ratio 'fast' is not a number"),
    ("a-b:0.5", "two integers"),
    ("", "non-empty"),
    ("999-0:-0.2", "negative ratio"),
])
def test_bad_specs_are_refused_with_a_reason(spec, message):
    with pytest.raises(DitmergeError, match=message):
        parse_buckets(spec)
