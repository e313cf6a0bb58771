//! Python bindings (PyO3 0.17) for the inner-reward kernel in `kernel.rs`.
//!
//! Inputs are read in place through the buffer protocol (NumPy arrays, memoryviews, anything
//! C-contiguous and 1-D): bool or uint8 for the flags, float32 for dwell and relevance. The
//! Python wrapper in `rust_ext/__init__.py` converts other types (lists, float64, pyarrow) first.

use std::ffi::CStr;

use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::once_cell::GILOnceCell;
use pyo3::pyclass::CompareOp;
use pyo3::prelude::*;
use pyo3::types::PyDict;

mod kernel;
use kernel::{BadInput, Columns, Weights};

/// A 0/1 byte: NumPy bool ('?') or uint8 ('B'). PyO3 0.17 has no bool `Element`.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Flag(u8);

// SAFETY: Flag is a transparent u8; we accept exactly the one-byte formats '?' and 'B'.
unsafe impl Element for Flag {
    fn is_compatible_format(format: &CStr) -> bool {
        let f = format.to_bytes();
        let f = f.strip_prefix(b"=").or_else(|| f.strip_prefix(b"@")).unwrap_or(f);
        let f = f.strip_prefix(b"<").or_else(|| f.strip_prefix(b"|")).unwrap_or(f);
        matches!(f, b"?" | b"B")
    }
}

/// Batches at least this long release the GIL; below it the release costs more than the loop.
const GIL_RELEASE_MIN_ITEMS: usize = 4096;

/// Inner-reward weights and clip range (validated: all finite, clip_lo ≤ clip_hi).
#[pyclass(name = "RewardWeights", module = "rust_ext")]
#[derive(Clone)]
struct PyRewardWeights {
    kernel: Weights,
    /// The exact values the caller gave (f64), for display and round-tripping.
    given: [f64; 6],
}

const MAX_WEIGHT: f64 = 1e6;

const WEIGHT_FIELDS: [&str; 6] = ["click_w", "dwell_w", "skip_penalty", "rel_w", "clip_lo", "clip_hi"];

#[pymethods]
impl PyRewardWeights {
    #[new]
    #[args(click_w = "1.0", dwell_w = "0.5", skip_penalty = "-0.3", rel_w = "0.8", clip_lo = "-5.0", clip_hi = "5.0")]
    fn new(click_w: f64, dwell_w: f64, skip_penalty: f64, rel_w: f64, clip_lo: f64, clip_hi: f64) -> PyResult<Self> {
        let given = [click_w, dwell_w, skip_penalty, rel_w, clip_lo, clip_hi];
        // |w| ≤ 1e6 keeps every term but relevance's finite, so no inf − inf (NaN) can reach the clip.
        for (name, v) in WEIGHT_FIELDS.iter().zip(given) {
            if !v.is_finite() || v.abs() > MAX_WEIGHT {
                return Err(PyValueError::new_err(format!("{name} must be finite with |{name}| <= 1e6, got {v}")));
            }
        }
        if clip_lo > clip_hi {
            return Err(PyValueError::new_err(format!(
                "clip_lo ({clip_lo}) must not exceed clip_hi ({clip_hi})"
            )));
        }
        let f = |v: f64| v as f32;
        let kernel = Weights {
            click_w: f(click_w),
            dwell_w: f(dwell_w),
            skip_penalty: f(skip_penalty),
            rel_w: f(rel_w),
            clip_lo: f(clip_lo),
            clip_hi: f(clip_hi),
        };
        Ok(PyRewardWeights { kernel, given })
    }

    #[getter]
    fn click_w(&self) -> f64 { self.given[0] }
    #[getter]
    fn dwell_w(&self) -> f64 { self.given[1] }
    #[getter]
    fn skip_penalty(&self) -> f64 { self.given[2] }
    #[getter]
    fn rel_w(&self) -> f64 { self.given[3] }
    #[getter]
    fn clip_lo(&self) -> f64 { self.given[4] }
    #[getter]
    fn clip_hi(&self) -> f64 { self.given[5] }

    /// The six fields as a dict (JSON-ready).
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<&'py PyDict> {
        let d = PyDict::new(py);
        for (name, v) in WEIGHT_FIELDS.iter().zip(self.given) {
            d.set_item(*name, v)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let g = self.given;
        format!(
            "RewardWeights(click_w={}, dwell_w={}, skip_penalty={}, rel_w={}, clip_lo={}, clip_hi={})",
            g[0], g[1], g[2], g[3], g[4], g[5]
        )
    }

    fn __richcmp__(&self, other: &PyAny, op: CompareOp, py: Python) -> PyObject {
        let same = other.extract::<PyRef<PyRewardWeights>>().map(|o| o.given == self.given);
        match (op, same) {
            (CompareOp::Eq, Ok(s)) => s.into_py(py),
            (CompareOp::Ne, Ok(s)) => (!s).into_py(py),
            _ => py.NotImplemented(),
        }
    }

    /// Pickle support, so weights can cross Ray task and actor boundaries.
    fn __reduce__(slf: PyRef<Self>, py: Python) -> PyResult<(PyObject, (f64, f64, f64, f64, f64, f64))> {
        let g = slf.given;
        let cls = slf.into_py(py).getattr(py, "__class__")?;
        Ok((cls, (g[0], g[1], g[2], g[3], g[4], g[5])))
    }
}

fn flag_buffer(obj: &PyAny, field: &str) -> PyResult<PyBuffer<Flag>> {
    let buf = PyBuffer::<Flag>::get(obj).map_err(|_| {
        PyTypeError::new_err(format!("{field}: expected a 1-D bool or uint8 buffer, got {}", type_name(obj)))
    })?;
    check_shape(&buf, field)?;
    Ok(buf)
}

fn f32_buffer(obj: &PyAny, field: &str) -> PyResult<PyBuffer<f32>> {
    let buf = PyBuffer::<f32>::get(obj).map_err(|_| {
        PyTypeError::new_err(format!("{field}: expected a 1-D float32 buffer, got {}", type_name(obj)))
    })?;
    check_shape(&buf, field)?;
    Ok(buf)
}

fn type_name(obj: &PyAny) -> String {
    obj.get_type().name().map(|s| s.to_string()).unwrap_or_else(|_| "?".into())
}

fn check_shape<T: Element>(buf: &PyBuffer<T>, field: &str) -> PyResult<()> {
    // PyO3 0.17 accepts '>' (big-endian) formats on little-endian hosts: refuse them here, so the
    // Python wrapper converts to native order instead of the kernel reading swapped bytes.
    let format = buf.format().to_bytes();
    if cfg!(target_endian = "little") && (format.starts_with(b">") || format.starts_with(b"!")) {
        return Err(PyTypeError::new_err(format!("{field}: expected native byte order, got a big-endian buffer")));
    }
    if buf.dimensions() != 1 {
        return Err(PyValueError::new_err(format!(
            "{field}: expected a contiguous 1-D array, got shape {:?}",
            buf.shape()
        )));
    }
    if !buf.is_c_contiguous() {
        // A TypeError, so the Python wrapper makes a contiguous copy and retries.
        return Err(PyTypeError::new_err(format!("{field}: expected a contiguous 1-D array, got a strided view")));
    }
    Ok(())
}

/// Borrowed views of four validated input buffers plus the output buffer.
struct Batch {
    clicked: PyBuffer<Flag>,
    dwell: PyBuffer<f32>,
    skipped: PyBuffer<Flag>,
    relevance: PyBuffer<f32>,
    out: PyBuffer<f32>,
    out_obj: PyObject,
    n: usize,
}

static NUMPY_EMPTY: GILOnceCell<PyObject> = GILOnceCell::new();

fn numpy_empty_f32(py: Python, n: usize) -> PyResult<PyObject> {
    let empty = match NUMPY_EMPTY.get(py) {
        Some(f) => f,
        None => {
            let f: PyObject = py.import("numpy")?.getattr("empty")?.into();
            let _ = NUMPY_EMPTY.set(py, f);
            NUMPY_EMPTY.get(py).unwrap()
        }
    };
    empty.call1(py, (n, "float32"))
}

fn overlaps<A, B>(a: &PyBuffer<A>, b: &PyBuffer<B>) -> bool
where
    A: Element,
    B: Element,
{
    let (a0, a1) = (a.buf_ptr() as usize, a.buf_ptr() as usize + a.len_bytes());
    let (b0, b1) = (b.buf_ptr() as usize, b.buf_ptr() as usize + b.len_bytes());
    a0 < b1 && b0 < a1
}

impl Batch {
    fn open(
        py: Python,
        clicked: &PyAny,
        dwell: &PyAny,
        skipped: &PyAny,
        relevance: &PyAny,
        out: Option<&PyAny>,
    ) -> PyResult<Batch> {
        let clicked = flag_buffer(clicked, "clicked")?;
        let dwell = f32_buffer(dwell, "dwell")?;
        let skipped = flag_buffer(skipped, "skipped")?;
        let relevance = f32_buffer(relevance, "relevance")?;
        let n = clicked.item_count();
        for (field, len) in [("dwell", dwell.item_count()), ("skipped", skipped.item_count()), ("relevance", relevance.item_count())] {
            if len != n {
                return Err(PyValueError::new_err(format!(
                    "length mismatch: clicked has {n} items but {field} has {len}"
                )));
            }
        }
        let out_obj = match out {
            Some(o) => o.into_py(py),
            None => numpy_empty_f32(py, n)?,
        };
        let out = f32_buffer(out_obj.as_ref(py), "out")?;
        if out.readonly() {
            return Err(PyValueError::new_err("out: buffer is read-only"));
        }
        if out.item_count() != n {
            return Err(PyValueError::new_err(format!(
                "length mismatch: clicked has {n} items but out has {}",
                out.item_count()
            )));
        }
        if n > 0 && (overlaps(&out, &dwell) || overlaps(&out, &relevance) || overlaps(&out, &clicked) || overlaps(&out, &skipped)) {
            return Err(PyValueError::new_err("out: must not share memory with an input"));
        }
        Ok(Batch { clicked, dwell, skipped, relevance, out, out_obj, n })
    }

    /// Run the kernel, releasing the GIL when the batch is large enough for it to pay.
    fn score(&self, py: Python, w: Weights) -> Result<(), BadInput> {
        let n = self.n;
        let ptrs = (
            self.clicked.buf_ptr() as usize,
            self.dwell.buf_ptr() as usize,
            self.skipped.buf_ptr() as usize,
            self.relevance.buf_ptr() as usize,
            self.out.buf_ptr() as usize,
        );
        let run = move || {
            if n == 0 {
                return Ok(());
            }
            // SAFETY: each buffer holds n items of its type (checked in `open`), is contiguous,
            // outlives this call (the PyBuffers are held by `self`), and `out` is writable and
            // disjoint from the inputs.
            let (cols, out) = unsafe {
                (
                    Columns {
                        clicked: std::slice::from_raw_parts(ptrs.0 as *const u8, n),
                        dwell: std::slice::from_raw_parts(ptrs.1 as *const f32, n),
                        skipped: std::slice::from_raw_parts(ptrs.2 as *const u8, n),
                        relevance: std::slice::from_raw_parts(ptrs.3 as *const f32, n),
                    },
                    std::slice::from_raw_parts_mut(ptrs.4 as *mut f32, n),
                )
            };
            kernel::score(cols, w, out)
        };
        if n >= GIL_RELEASE_MIN_ITEMS { py.allow_threads(run) } else { run() }
    }

    fn out_slice(&self) -> &[f32] {
        // SAFETY: out holds n f32s and is not written while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.out.buf_ptr() as *const f32, self.n) }
    }
}

fn bad_input_error(bad: BadInput, offsets: Option<&[i64]>) -> PyErr {
    let (field, index, value, rule) = match bad {
        BadInput::Dwell { index, value } => ("dwell", index, value, "dwell seconds must be finite and >= 0"),
        BadInput::Relevance { index, value } => ("relevance", index, value, "relevance must be finite"),
    };
    let place = match offsets {
        Some(o) => {
            let slate = o.partition_point(|&start| start <= index as i64) - 1;
            format!(" (slate {slate}, position {})", index as i64 - o[slate])
        }
        None => String::new(),
    };
    PyValueError::new_err(format!("{field}[{index}]{place} = {value}: {rule}"))
}

fn weights_or_default(weights: Option<PyRef<PyRewardWeights>>) -> Weights {
    weights.map_or_else(Weights::default, |w| w.kernel)
}

/// inner_reward(clicked, dwell, skipped, relevance, weights=None, out=None) -> float32 array
///
/// reward_i = clip(click_w·clicked_i + dwell_w·ln(1+dwell_i) + skip_penalty·skipped_i
/// + rel_w·relevance_i, clip_lo, clip_hi). Raises ValueError naming the first bad field/index.
#[pyfunction(weights = "None", out = "None")]
fn inner_reward(
    py: Python,
    clicked: &PyAny,
    dwell: &PyAny,
    skipped: &PyAny,
    relevance: &PyAny,
    weights: Option<PyRef<PyRewardWeights>>,
    out: Option<&PyAny>,
) -> PyResult<PyObject> {
    let batch = Batch::open(py, clicked, dwell, skipped, relevance, out)?;
    batch.score(py, weights_or_default(weights)).map_err(|b| bad_input_error(b, None))?;
    Ok(batch.out_obj)
}

/// inner_reward_slates(offsets, clicked, dwell, skipped, relevance, weights=None)
///     -> (rewards float32[n_items], slate_totals float32[n_slates])
///
/// Many slates in one call, CSR-style: slate j is items offsets[j]..offsets[j+1] (int64).
#[pyfunction(weights = "None")]
fn inner_reward_slates(
    py: Python,
    offsets: &PyAny,
    clicked: &PyAny,
    dwell: &PyAny,
    skipped: &PyAny,
    relevance: &PyAny,
    weights: Option<PyRef<PyRewardWeights>>,
) -> PyResult<(PyObject, PyObject)> {
    let offsets_buf = PyBuffer::<i64>::get(offsets).map_err(|_| {
        PyTypeError::new_err(format!("offsets: expected a 1-D int64 buffer, got {}", type_name(offsets)))
    })?;
    check_shape(&offsets_buf, "offsets")?;
    let batch = Batch::open(py, clicked, dwell, skipped, relevance, None)?;
    // SAFETY: a contiguous 1-D int64 buffer of item_count entries, alive for this call.
    let offs = unsafe { std::slice::from_raw_parts(offsets_buf.buf_ptr() as *const i64, offsets_buf.item_count()) };
    kernel::check_offsets(offs, batch.n).map_err(|m| PyValueError::new_err(format!("offsets: {m}")))?;
    batch.score(py, weights_or_default(weights)).map_err(|b| bad_input_error(b, Some(offs)))?;
    let n_slates = offs.len() - 1;
    let totals_obj = numpy_empty_f32(py, n_slates)?;
    let totals = f32_buffer(totals_obj.as_ref(py), "totals")?;
    // SAFETY: a fresh, writable float32 array of n_slates items.
    let totals_slice = unsafe { std::slice::from_raw_parts_mut(totals.buf_ptr() as *mut f32, n_slates) };
    kernel::slate_totals(offs, batch.out_slice(), totals_slice);
    Ok((batch.out_obj, totals_obj))
}

/// ln(1 + x) as the kernel computes it, over a float32 buffer (for tests of the polynomial).
#[pyfunction]
fn ln_1p_f32(py: Python, x: &PyAny) -> PyResult<PyObject> {
    let xb = f32_buffer(x, "x")?;
    let n = xb.item_count();
    let out_obj = numpy_empty_f32(py, n)?;
    let out = f32_buffer(out_obj.as_ref(py), "out")?;
    // SAFETY: both buffers hold n contiguous f32s; out is fresh and writable.
    unsafe {
        let xs = std::slice::from_raw_parts(xb.buf_ptr() as *const f32, n);
        let os = std::slice::from_raw_parts_mut(out.buf_ptr() as *mut f32, n);
        for (o, &v) in os.iter_mut().zip(xs) {
            *o = kernel::ln_1p(v);
        }
    }
    Ok(out_obj)
}

#[pymodule]
fn _native(_py: Python, m: &PyModule) -> PyResult<()> {
    m.add_class::<PyRewardWeights>()?;
    m.add_function(wrap_pyfunction!(inner_reward, m)?)?;
    m.add_function(wrap_pyfunction!(inner_reward_slates, m)?)?;
    m.add_function(wrap_pyfunction!(ln_1p_f32, m)?)?;
    m.add("PARALLEL_MIN_ITEMS", kernel::PARALLEL_MIN_ITEMS)?;
    m.add("GIL_RELEASE_MIN_ITEMS", GIL_RELEASE_MIN_ITEMS)?;
    Ok(())
}
