"""Compiled (numba) kernels of the Hamming ranking: the one pass that search and every measure share.

Each query's distance row is computed once (XOR + popcount of packed words)
and feeds everything asked of it: the ranking's top k (the k-th smallest
distance found by counting, then the items at or below it placed by a
counting sort, equal distances in ascending index: ``conmh.hamming.TIE_RULE``),
and for the evaluation, the histogram of the row and of its relevant items
(precision and recall at every radius), AP@K from the top k and, on request,
the rank of every relevant item (AP over the whole ranking). A kernel call
ranks one block of queries with its own scratch and releases the GIL
(``nogil``), so that ``conmh.hamming.run_kernel`` runs blocks on several
Python threads: serial kernels compile in a fraction of the time of numba's
``parallel=True`` ones and load faster from the cache (benchmarks/README.md).

Imported only by the functions that run a kernel, so that ``import conmh``
and the commands that rank nothing do not load numba. Compiled once per
word and row dtype and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_SKIP = 64  # items compared at once into a bit mask (vectorised), whose set bits are then visited


@njit(inline="always")
def _popcount(x):
    """Set bits of a uint64 (the SWAR idiom, which LLVM turns into popcnt / vpopcntq)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


@njit(cache=True)
def distance_row(query, words, row):
    """Hamming distances of one query (n_words,) to every code of ``words`` (n_words, N), into ``row`` (N,)."""
    n = words.shape[1]
    q, w = np.uint64(query[0]), words[0]
    for i in range(n):
        row[i] = _popcount(np.uint64(w[i]) ^ q)
    for j in range(1, words.shape[0]):
        q, w = np.uint64(query[j]), words[j]
        for i in range(n):
            row[i] += _popcount(np.uint64(w[i]) ^ q)


@njit(cache=True)
def _count_at_most(row, t, scratch):
    """count(row <= t), compared in the row's own dtype (``scratch``: a 1-element array of it)."""
    scratch[0] = t
    tt = scratch[0]
    c = 0
    for i in range(row.size):
        c += row[i] <= tt
    return c


@njit(cache=True)
def kth_and_below(row, k, max_distance, guess, scratch):
    """(t, count(row < t)) for t the k-th smallest value of ``row``: the least t with count(row <= t) >= k.

    Found by counting, probing outwards from ``guess`` with doubling steps
    (neighbouring queries have similar thresholds: two probes usually settle it).
    """
    lo, hi = -1, max_distance  # invariant: count(<= lo) < k <= count(<= hi)
    below = 0  # count(<= lo)
    probe, step = guess, 1
    while hi - lo > 1:
        t = min(max(probe, lo + 1), hi - 1)
        c = _count_at_most(row, t, scratch)
        if c >= k:
            hi, probe = t, t - step
        else:
            lo, probe, below = t, t + step, c
        step *= 2
    return hi, below


@njit(cache=True)
def kth_distance(dist, k, max_distance, guess):
    """The k-th smallest value of ``dist`` (values in 0..max_distance), see :func:`kth_and_below`."""
    return kth_and_below(dist, k, max_distance, guess, np.empty(1, dist.dtype))[0]


@njit(cache=True)
def nearest(row, k, kth, below, out, first, counts, scratch):
    """The ``k`` items of ``row`` ranked first by (distance, index), into ``out`` (k,), given the k-th distance.

    ``below`` = count(row < kth) (fewer than k items): all of them, counting-
    sorted by distance in index order, then the first k - below items at
    ``kth`` in index order. ``first`` (k,) and ``counts`` (>= kth + 1) are scratch.
    """
    n = row.size
    scratch[0] = kth
    tt = scratch[0]
    lim = tt  # items <= lim are looked at: <= kth, then < kth once enough items at kth are found
    need_eq = k - below
    n_lt, n_eq = 0, 0
    end = n - n % _SKIP
    start = 0
    while start < end and (n_lt < below or n_eq < need_eq):
        mask = np.uint64(0)
        for j in range(_SKIP):  # a constant trip count: LLVM vectorises this into a bit mask
            mask |= np.uint64(row[start + j] <= lim) << np.uint64(j)
        while mask:
            low = mask & (~mask + np.uint64(1))
            i = start + _popcount(low - np.uint64(1))  # the lowest set bit's position
            mask ^= low
            if row[i] < tt:
                out[n_lt] = i
                n_lt += 1
            elif n_eq < need_eq:
                first[n_eq] = i
                n_eq += 1
                if n_eq == need_eq and tt > 0:
                    scratch[0] = kth - 1
                    lim = scratch[0]
        start += _SKIP
    for i in range(max(start, end), n):
        d = row[i]
        if d < tt:
            out[n_lt] = i
            n_lt += 1
        elif d == tt and n_eq < need_eq:
            first[n_eq] = i
            n_eq += 1
    counts[: kth + 1] = 0
    for j in range(below):
        counts[row[out[j]] + 1] += 1
    for d in range(1, kth + 1):
        counts[d] += counts[d - 1]  # counts[d]: items below distance d
    for j in range(below):  # stable counting sort of out[:below] into first[need_eq:] ... then back
        d = row[out[j]]
        first[need_eq + counts[d]] = out[j]
        counts[d] += 1
    out[:below] = first[need_eq : need_eq + below]
    out[below:k] = first[:need_eq]


@njit(nogil=True, cache=True)
def search_kernel(start, stop, q_words, db_words, row_like, nbits, indices, distances):
    """Top k (k = indices.shape[1]) of queries ``start`` to ``stop`` - 1, ranked by ``TIE_RULE``."""
    n, k = db_words.shape[1], indices.shape[1]
    row = np.empty(n, row_like.dtype)
    scratch = np.empty(1, row_like.dtype)
    first = np.empty(k, np.int64)
    counts = np.empty(nbits + 2, np.int64)
    guess = nbits // 2
    for i in range(start, stop):
        distance_row(q_words[:, i], db_words, row)
        kth, below = kth_and_below(row, k, nbits, guess, scratch)
        guess = kth
        nearest(row, k, kth, below, indices[i], first, counts, scratch)
        for r in range(k):
            distances[i, r] = row[indices[i, r]]


@njit(cache=True)
def _block_sum(a, lo, n):
    """numpy's sum of at most 128 items: 8 accumulators, then the rest in order."""
    if n < 8:
        res = -0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0, r1, r2, r3 = r0 + a[lo + i], r1 + a[lo + i + 1], r2 + a[lo + i + 2], r3 + a[lo + i + 3]
        r4, r5, r6, r7 = r4 + a[lo + i + 4], r5 + a[lo + i + 5], r6 + a[lo + i + 6], r7 + a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True)
def numpy_sum(a, lo, n):
    """sum(a[lo:lo + n]) added in the order of numpy's ``np.sum``, so with the same bits.

    numpy halves the range (at a multiple of 8) until at most 128 items are
    left; the halves' sums are added. Walked here with an explicit stack
    (numba's on-disk cache does not handle recursive functions).
    """
    los, ns = np.empty(64, np.int64), np.empty(64, np.int64)
    state, left = np.zeros(64, np.int64), np.empty(64, np.float64)
    los[0], ns[0], state[0], sp, ret = lo, n, 0, 1, 0.0
    while sp:
        f = sp - 1
        half = ns[f] // 2
        half -= half % 8
        if ns[f] <= 128:
            ret = _block_sum(a, los[f], ns[f])  # a finished range: its sum goes to the frame below
            sp -= 1
        elif state[f] == 0:  # sum the first half
            state[f] = 1
            los[sp], ns[sp], state[sp] = los[f], half, 0
            sp += 1
        elif state[f] == 1:  # first half done: sum the second
            left[f], state[f] = ret, 2
            los[sp], ns[sp], state[sp] = los[f] + half, ns[f] - half, 0
            sp += 1
        else:  # both done
            ret = left[f] + ret
            sp -= 1
    return ret


@njit(cache=True)
def _histogram(row, start, stop, hist8):
    """Add the values of row[start:stop] to ``hist8`` (8, bins): eight interleaved histograms (no store chains)."""
    i = start
    while i + 8 <= stop:
        for j in range(8):
            hist8[j, row[i + j]] += 1
        i += 8
    while i < stop:
        hist8[0, row[i]] += 1
        i += 1


@njit(inline="always")
def _bin(hist8, d):
    """The count of value d in the eight histograms."""
    return hist8[0, d] + hist8[1, d] + hist8[2, d] + hist8[3, d] + hist8[4, d] + hist8[5, d] + hist8[6, d] + hist8[7, d]


@njit(cache=True)
def _kth_from_histogram(hist8, k):
    """(t, count(row < t)) for t the k-th smallest value of a row, from its histograms (8, bins)."""
    below = 0
    for d in range(hist8.shape[1]):
        c = _bin(hist8, d)
        if below + c >= k:
            return d, below
        below += c
    return hist8.shape[1] - 1, below  # not reached: k <= the row's length


@njit(nogil=True, cache=True)
def evaluate_kernel(
    start,
    stop,
    q_words,
    db_words,
    row_like,
    nbits,
    ks,
    kmax,
    q_ptr,
    q_classes,
    m_ptr,
    members,
    full,
    ap,
    precision,
    recall,
    n_relevant,
    full_ap,
):
    """Every measure of queries ``start`` to ``stop`` - 1, each from one computation of its distance row.

    Relevance: database item m is relevant to query i when it is in the
    member list of one of the query's classes (CSR: ``q_classes[q_ptr[i]:q_ptr[i+1]]``,
    ``members[m_ptr[c]:m_ptr[c+1]]``). Writes AP@K for each K of ``ks``
    (from the ranking's top ``kmax``), precision and recall at radius
    0..nbits, the number of relevant items and, with ``full``, the AP over
    the whole ranking. The row's histogram gives the k-th distance (no
    counting probes needed here). Floating-point operations are those of the
    formulas' numpy transcription, in its order: the results are the same bits.
    """
    n, bins = db_words.shape[1], nbits + 1
    row = np.empty(n, row_like.dtype)
    scratch = np.empty(1, row_like.dtype)
    top = np.empty(kmax, np.int64)
    first = np.empty(kmax, np.int64)
    counts = np.empty(nbits + 2, np.int64)
    gain = np.empty(kmax, np.float64)
    mark = np.zeros(n, np.bool_)
    rel = np.empty(n, np.int64)
    same_before = np.empty(n if full else 0, np.int64)
    terms = np.empty(n if full else 0, np.float64)
    hist8 = np.empty((8, bins), np.int32)
    hist_rel = np.empty(bins, np.int64)
    for i in range(start, stop):
        distance_row(q_words[:, i], db_words, row)
        # the relevant items: the union of the query's classes' members
        nr = 0
        for c in q_classes[q_ptr[i] : q_ptr[i + 1]]:
            for m in members[m_ptr[c] : m_ptr[c + 1]]:
                if not mark[m]:
                    mark[m] = True
                    rel[nr] = m
                    nr += 1
        n_relevant[i] = nr
        # histogram of the row; with ``full``, taken in index order up to each relevant item, which
        # gives the items of its distance ranked before it
        hist8[:] = 0
        if full and nr:
            rel[:nr].sort()
            pos = 0
            for j in range(nr):
                m = rel[j]
                _histogram(row, pos, m, hist8)
                d = row[m]
                same_before[j] = _bin(hist8, d)
                hist8[0, d] += 1
                pos = m + 1
            _histogram(row, pos, n, hist8)
        else:
            _histogram(row, 0, n, hist8)
        # AP@K = (1/K) sum_{r <= K} rel(r) P(r) over the ranking's top kmax
        kth, below = _kth_from_histogram(hist8, kmax)
        nearest(row, kmax, kth, below, top, first, counts, scratch)
        hits, g = 0, 0.0
        for r in range(kmax):
            if mark[top[r]]:
                hits += 1
                g += hits / (r + 1)
            gain[r] = g
        for j in range(ks.size):
            ap[i, j] = gain[min(ks[j], kmax) - 1] / ks[j]
        # precision and recall at every radius
        hist_rel[:] = 0
        for j in range(nr):
            hist_rel[row[rel[j]]] += 1
        retrieved, hit = 0, 0
        for r in range(bins):
            retrieved += _bin(hist8, r)
            hit += hist_rel[r]
            precision[i, r] = hit / retrieved if retrieved > 0 else 0.0
            recall[i, r] = hit / nr if nr > 0 else 0.0
        if full and nr:
            # rank of a relevant item (from 1) = items at smaller distances + same distance before it + 1
            acc = 0
            for d in range(bins):
                counts[d] = acc  # items below distance d
                acc += _bin(hist8, d)
            for j in range(nr):
                same_before[j] += counts[row[rel[j]]] + 1
            ranks = np.sort(same_before[:nr])
            for j in range(nr):
                terms[j] = (j + 1) / ranks[j]
            full_ap[i] = numpy_sum(terms, 0, nr) / nr  # np.mean, as the formula's transcription
        for j in range(nr):
            mark[rel[j]] = False
