//! The inner-reward kernel: pure Rust over plain slices, no Python in sight.
//!
//! reward_i = clip(click_w·clicked_i + dwell_w·ln(1 + dwell_i) + skip_penalty·skipped_i
//!                 + rel_w·relevance_i, clip_lo, clip_hi)
//!
//! The loop body is branch-free so LLVM vectorises it; `ln(1+x)` is a polynomial (musl's
//! range reduction + an atanh series) because a scalar libm `log1pf` costs ~15 ns/item here.
//! Input validation (dwell finite and ≥ 0, relevance finite) rides along in the same pass as
//! two OR-reductions; only when one trips do we scan again to find the first bad index.

use rayon::prelude::*;

/// Scoring weights and clip range, already validated (finite, clip_lo ≤ clip_hi).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    pub click_w: f32,
    pub dwell_w: f32,
    pub skip_penalty: f32,
    pub rel_w: f32,
    pub clip_lo: f32,
    pub clip_hi: f32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { click_w: 1.0, dwell_w: 0.5, skip_penalty: -0.3, rel_w: 0.8, clip_lo: -5.0, clip_hi: 5.0 }
    }
}

/// Borrowed columns of one batch of served items (all the same length).
#[derive(Clone, Copy)]
pub struct Columns<'a> {
    pub clicked: &'a [u8],
    pub dwell: &'a [f32],
    pub skipped: &'a [u8],
    pub relevance: &'a [f32],
}

/// The first invalid input found, by field and index.
#[derive(Debug, Clone, PartialEq)]
pub enum BadInput {
    Dwell { index: usize, value: f32 },
    Relevance { index: usize, value: f32 },
}

const LN2: f32 = std::f32::consts::LN_2;

/// ln(1 + x) for x ≥ 0 in branch-free f32 arithmetic (error ≤ 1.5e-7 + 2 ulp).
///
/// y = 1 + x is split as y = 2^k·m with m ∈ [√½, √2) (musl's logf reduction); then
/// ln m = 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.1716, summed to s⁹; the rounding error of
/// 1 + x is added back as c/y with c = x − (y − 1).
#[inline(always)]
pub fn ln_1p(x: f32) -> f32 {
    let y = 1.0 + x;
    let c = (x - (y - 1.0)) / y;
    let ix = y.to_bits().wrapping_add(0x3f80_0000 - 0x3f35_04f3);
    let k = (ix >> 23) as i32 - 0x7f;
    let m = f32::from_bits((ix & 0x007f_ffff) + 0x3f35_04f3);
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    k as f32 * LN2 + (2.0 * s + 2.0 * s * series) + c
}

#[inline(always)]
fn score_generic(cols: Columns, w: Weights, out: &mut [f32]) -> (bool, bool) {
    let n = out.len();
    let (clicked, dwell, skipped, relevance) =
        (&cols.clicked[..n], &cols.dwell[..n], &cols.skipped[..n], &cols.relevance[..n]);
    let mut bad_dwell = false;
    let mut bad_rel = false;
    for i in 0..n {
        let d = dwell[i];
        let r = relevance[i];
        // NaN fails both comparisons, so it is caught as well as ±inf and negatives.
        bad_dwell |= !(d >= 0.0 && d <= f32::MAX);
        bad_rel |= !(r.abs() <= f32::MAX);
        let c = (clicked[i] != 0) as u8 as f32;
        let s = (skipped[i] != 0) as u8 as f32;
        let v = w.click_w * c + w.dwell_w * ln_1p(d.max(0.0)) + w.skip_penalty * s + w.rel_w * r;
        let v = if v < w.clip_lo { w.clip_lo } else { v };
        out[i] = if v > w.clip_hi { w.clip_hi } else { v };
    }
    (bad_dwell, bad_rel)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_avx2(cols: Columns, w: Weights, out: &mut [f32]) -> (bool, bool) {
    score_generic(cols, w, out)
}

/// Score one contiguous chunk on this thread, choosing the widest SIMD the CPU has.
fn score_chunk(cols: Columns, w: Weights, out: &mut [f32]) -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { score_avx2(cols, w, out) };
        }
    }
    score_generic(cols, w, out)
}

/// Batches at least this long are split across rayon's pool (see benchmarks/inner_reward.py).
pub const PARALLEL_MIN_ITEMS: usize = 1 << 18;
const PARALLEL_CHUNK: usize = 1 << 16;

fn first_bad(cols: Columns) -> Option<BadInput> {
    if let Some(i) = cols.dwell.iter().position(|d| !(*d >= 0.0 && *d <= f32::MAX)) {
        return Some(BadInput::Dwell { index: i, value: cols.dwell[i] });
    }
    cols.relevance
        .iter()
        .position(|r| !(r.abs() <= f32::MAX))
        .map(|i| BadInput::Relevance { index: i, value: cols.relevance[i] })
}

/// Score every item into `out` (same length as the columns, checked by the caller).
pub fn score(cols: Columns, w: Weights, out: &mut [f32]) -> Result<(), BadInput> {
    let n = out.len();
    let (bad_dwell, bad_rel) = if n >= PARALLEL_MIN_ITEMS {
        out.par_chunks_mut(PARALLEL_CHUNK)
            .enumerate()
            .map(|(j, chunk)| {
                let lo = j * PARALLEL_CHUNK;
                let hi = lo + chunk.len();
                let part = Columns {
                    clicked: &cols.clicked[lo..hi],
                    dwell: &cols.dwell[lo..hi],
                    skipped: &cols.skipped[lo..hi],
                    relevance: &cols.relevance[lo..hi],
                };
                score_chunk(part, w, chunk)
            })
            .reduce(|| (false, false), |a, b| (a.0 | b.0, a.1 | b.1))
    } else {
        score_chunk(cols, w, out)
    };
    if bad_dwell || bad_rel {
        return Err(first_bad(cols).expect("a flagged batch has a bad item"));
    }
    Ok(())
}

/// Check CSR slate offsets: offsets[0] = 0, non-decreasing, offsets[last] = n_items.
pub fn check_offsets(offsets: &[i64], n_items: usize) -> Result<(), String> {
    match offsets.first() {
        None => return Err("offsets must hold at least one entry (0)".into()),
        Some(&o) if o != 0 => return Err(format!("offsets[0] must be 0, got {o}")),
        _ => {}
    }
    if let Some(i) = offsets.windows(2).position(|p| p[1] < p[0]) {
        return Err(format!(
            "offsets must be non-decreasing, but offsets[{}] = {} < offsets[{}] = {}",
            i + 1,
            offsets[i + 1],
            i,
            offsets[i]
        ));
    }
    let last = *offsets.last().unwrap();
    if last != n_items as i64 {
        return Err(format!("offsets[-1] = {last} must equal the number of items ({n_items})"));
    }
    Ok(())
}

/// Per-slate totals of already-scored rewards (f64 accumulation, f32 result).
pub fn slate_totals(offsets: &[i64], rewards: &[f32], totals: &mut [f32]) {
    for (t, w) in totals.iter_mut().zip(offsets.windows(2)) {
        let s: f64 = rewards[w[0] as usize..w[1] as usize].iter().map(|&r| r as f64).sum();
        *t = s as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_1p_matches_libm() {
        // Within 1.5e-7 absolute plus 2 float32 ulps of the exact value.
        let mut worst: f64 = 0.0;
        let mut x = 0.0f32;
        while x < 1e30 {
            let exact = (x as f64).ln_1p();
            let err = (ln_1p(x) as f64 - exact).abs() / (1.5e-7 + 2.4e-7 * exact);
            worst = worst.max(err);
            x = if x < 1e-6 { x + 1e-9 } else { x * 1.001 };
        }
        assert!(worst < 1.0, "worst scaled error {worst}");
    }

    #[test]
    fn score_flags_first_bad_dwell() {
        let cols = Columns {
            clicked: &[1, 0, 1],
            dwell: &[1.0, f32::NAN, -1.0],
            skipped: &[0, 1, 0],
            relevance: &[0.5, 0.5, 0.5],
        };
        let mut out = [0.0f32; 3];
        let err = score(cols, Weights::default(), &mut out).unwrap_err();
        assert!(matches!(err, BadInput::Dwell { index: 1, .. }));
    }

    #[test]
    fn offsets_are_checked() {
        assert!(check_offsets(&[0, 2, 5], 5).is_ok());
        assert!(check_offsets(&[0, 3, 2], 3).is_err());
        assert!(check_offsets(&[1, 3], 3).is_err());
        assert!(check_offsets(&[0, 3], 4).is_err());
        assert!(check_offsets(&[], 0).is_err());
    }
}
