//! A restricted pickle reader for `torch.save` state dicts.
//!
//! A pickle can call any Python callable, so loading a `.pth` file is a security boundary. This
//! reader interprets only the opcodes that `torch.save` emits for a dict of tensors (protocols 2
//! to 4) and only the globals listed in [`Global`]; anything else is an error. Tensors come out as
//! [`TensorRef`]s that point into the zip entry holding their storage; no bytes are copied here.

use std::collections::HashMap;

/// Upper bounds that keep a hostile file from making us allocate without limit.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;
/// Deepest nesting of containers. A state dict nests about four levels; the limit keeps the
/// recursive `Clone`/`Drop` of a hostile, deeply nested value from overflowing the stack.
const MAX_DEPTH: u32 = 64;
/// Memo PUT and GET copy values, so a few bytes can double a value's size again and again. The
/// total size copied (see [`Slot::weight`]) may be this much plus [`CLONE_BUDGET_PER_BYTE`] per
/// input byte, which is far more than `torch.save` output needs.
const CLONE_BUDGET_BASE: usize = 1 << 20;
const CLONE_BUDGET_PER_BYTE: usize = 8;

/// The element type named by a storage class (`torch.BFloat16Storage` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    BF16,
    F16,
    F32,
}

/// A tensor as described by the pickle: its storage key and how to view the storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub kind: StorageKind,
    /// Name of the storage entry, `<prefix>/data/<key>` inside the zip.
    pub key: String,
    /// Elements in the whole storage.
    pub storage_numel: u64,
    /// Offset of the first element, in elements.
    pub offset: u64,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The callables and classes a state dict may reference.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageKind),
}

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage {
        kind: StorageKind,
        key: String,
        numel: u64,
    },
    Tensor(TensorRef),
}

/// Parses a `data.pkl` and returns the (name, tensor) pairs of the top-level dict, in file order.
pub fn read_state_dict(data: &[u8]) -> Result<Vec<(String, TensorRef)>, String> {
    let mut vm = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        clone_budget: CLONE_BUDGET_PER_BYTE
            .saturating_mul(data.len())
            .saturating_add(CLONE_BUDGET_BASE),
    };
    let root = vm.run()?;
    let Value::Dict(items) = root else {
        return Err(format!("top-level object is a {}, not a dict", root.kind()));
    };
    items
        .into_iter()
        .map(|(k, v)| match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => Ok((name, t)),
            (Value::Str(name), other) => Err(format!(
                "entry `{name}` is a {}, not a tensor",
                other.kind()
            )),
            (k, _) => Err(format!("dict key is a {}, not a string", k.kind())),
        })
        .collect()
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Mark => "mark",
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage { .. } => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// A value on the stack or in the memo, with the bookkeeping that bounds copies of it.
#[derive(Clone, Debug)]
struct Slot {
    value: Value,
    /// Nesting depth: 0 for a scalar, 1 + the deepest element for a container.
    depth: u32,
    /// Size in units of a node or a string byte: what a copy of the value costs.
    weight: usize,
}

impl Slot {
    /// A value that holds no other values.
    fn leaf(value: Value) -> Self {
        let weight = 1 + match &value {
            Value::Str(s) => s.len(),
            Value::Storage { key, .. } => key.len(),
            Value::Tensor(t) => t.key.len() + t.shape.len() + t.stride.len(),
            _ => 0,
        };
        Self {
            value,
            depth: 0,
            weight,
        }
    }

    /// A tuple of `items`.
    fn tuple(items: Vec<Slot>) -> Result<Self, String> {
        let mut depth = 0;
        let mut weight = 1usize;
        let values = items
            .into_iter()
            .map(|s| {
                depth = depth.max(s.depth + 1);
                weight = weight.saturating_add(s.weight);
                s.value
            })
            .collect();
        let slot = Self {
            value: Value::Tuple(values),
            depth,
            weight,
        };
        slot.check_depth()?;
        Ok(slot)
    }

    fn check_depth(&self) -> Result<(), String> {
        if self.depth > MAX_DEPTH {
            return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Slot>,
    /// Weight that memo PUT/GET may still copy before the pickle is refused.
    clone_budget: usize,
}

impl Machine<'_> {
    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.byte()?;
            if op == b'.' {
                return self.pop();
            }
            self.step(op)
                .map_err(|e| format!("{e} (opcode 0x{op:02x} at byte {at})"))?;
            if self.stack.len() > MAX_STACK || self.memo.len() > MAX_MEMO {
                return Err("pickle exceeds the stack or memo limit".into());
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => {
                self.byte()?; // PROTO: version number, any of 2..=5 reads the same here.
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint only.
            }
            b'}' => self.push(Value::Dict(Vec::new())),
            b']' => self.push(Value::List(Vec::new())),
            b')' => self.push(Value::Tuple(Vec::new())),
            b'(' => self.push(Value::Mark),
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.byte()?;
                self.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()));
            }
            0x8a => self.long1()?,
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.push(Value::Float(v));
            }
            b'X' => {
                let len = u32::from_le_bytes(self.array()?) as usize;
                self.string(len)?;
            }
            0x8c => {
                let len = self.byte()? as usize;
                self.string(len)?;
            }
            0x8d => {
                let len = u64::from_le_bytes(self.array()?);
                let len = usize::try_from(len).map_err(|_| "string length overflows")?;
                self.string(len)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(resolve_global(&module, &name)?));
            }
            0x93 => {
                let name = self.pop_str()?;
                let module = self.pop_str()?;
                self.push(Value::Global(resolve_global(&module, &name)?));
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push(persistent_load(pid)?);
            }
            b't' => {
                let items = self.pop_mark()?;
                let tuple = Slot::tuple(items)?;
                self.stack.push(tuple);
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if self.stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                if items.iter().any(|s| matches!(s.value, Value::Mark)) {
                    return Err("unexpected MARK".into());
                }
                let tuple = Slot::tuple(items)?;
                self.stack.push(tuple);
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let out = call(callable, args)?;
                self.push(out);
            }
            b'b' => {
                // BUILD: the only object built here is an OrderedDict whose state holds torch's
                // `_metadata`; it carries no tensors, so the state is dropped.
                self.pop()?;
                match self.stack.last().map(|s| &s.value) {
                    Some(Value::Dict(_)) => {}
                    Some(other) => return Err(format!("BUILD on a {}", other.kind())),
                    None => return Err("stack underflow".into()),
                }
            }
            b's' => {
                let value = self.pop_slot()?;
                let key = self.pop_slot()?;
                let (depth, weight) = (
                    key.depth.max(value.depth),
                    key.weight.saturating_add(value.weight),
                );
                let (slot, dict) = self.dict_top()?;
                dict.push((key.value, value.value));
                slot_absorb(slot, depth, weight)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let (depth, weight) = summarize(&items);
                let mut iter = items.into_iter().map(|s| s.value);
                let (slot, dict) = self.dict_top()?;
                while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                    dict.push((k, v));
                }
                slot_absorb(slot, depth, weight)?;
            }
            b'a' => {
                let value = self.pop_slot()?;
                let (slot, list) = self.list_top()?;
                list.push(value.value);
                slot_absorb(slot, value.depth, value.weight)?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                let (depth, weight) = summarize(&items);
                let (slot, list) = self.list_top()?;
                list.extend(items.into_iter().map(|s| s.value));
                slot_absorb(slot, depth, weight)?;
            }
            b'q' => {
                let idx = self.byte()?.into();
                self.put(idx)?;
            }
            b'r' => {
                let idx = u32::from_le_bytes(self.array()?);
                self.put(idx)?;
            }
            0x94 => {
                let idx = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
                self.put(idx)?;
            }
            b'h' => {
                let idx = self.byte()?.into();
                self.get(idx)?;
            }
            b'j' => {
                let idx = u32::from_le_bytes(self.array()?);
                self.get(idx)?;
            }
            _ => return Err(format!("opcode 0x{op:02x} is not allowed in a state dict")),
        }
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.data.get(self.pos).ok_or("unexpected end of pickle")?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("unexpected end of pickle")?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let bytes = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL")?;
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += len + 1;
        Ok(text.to_owned())
    }

    fn string(&mut self, len: usize) -> Result<(), String> {
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| "string is not UTF-8")?
            .to_owned();
        self.push(Value::Str(s));
        Ok(())
    }

    fn long1(&mut self) -> Result<(), String> {
        let len = self.byte()? as usize;
        if len > 8 {
            return Err("integer wider than 64 bits".into());
        }
        let bytes = self.take(len)?;
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(bytes);
        if len > 0 && bytes[len - 1] & 0x80 != 0 {
            buf[len..].fill(0xff); // Sign-extend negative numbers.
        }
        self.push(Value::Int(i64::from_le_bytes(buf)));
        Ok(())
    }

    fn push(&mut self, value: Value) {
        self.stack.push(Slot::leaf(value));
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.pop_slot().map(|s| s.value)
    }

    fn pop_slot(&mut self) -> Result<Slot, String> {
        match self.stack.pop() {
            Some(Slot {
                value: Value::Mark, ..
            }) => Err("unexpected MARK".into()),
            Some(s) => Ok(s),
            None => Err("stack underflow".into()),
        }
    }

    fn pop_str(&mut self) -> Result<String, String> {
        match self.pop()? {
            Value::Str(s) => Ok(s),
            other => Err(format!("expected a string, found a {}", other.kind())),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Slot>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|s| matches!(s.value, Value::Mark))
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// The dict on top of the stack, with its depth/weight bookkeeping.
    fn dict_top(&mut self) -> Result<(SlotMeta<'_>, &mut DictItems), String> {
        match self.stack.last_mut() {
            Some(Slot {
                value: Value::Dict(items),
                depth,
                weight,
            }) => Ok(((depth, weight), items)),
            _ => Err("SETITEM target is not a dict".into()),
        }
    }

    /// The list on top of the stack, with its depth/weight bookkeeping.
    fn list_top(&mut self) -> Result<(SlotMeta<'_>, &mut Vec<Value>), String> {
        match self.stack.last_mut() {
            Some(Slot {
                value: Value::List(items),
                depth,
                weight,
            }) => Ok(((depth, weight), items)),
            _ => Err("APPEND target is not a list".into()),
        }
    }

    /// Takes `weight` from the copy budget, or refuses the pickle when it is spent.
    fn charge_copy(&mut self, weight: usize) -> Result<(), String> {
        self.clone_budget = self
            .clone_budget
            .checked_sub(weight)
            .ok_or("memo copies exceed the size limit (a pickle bomb?)")?;
        Ok(())
    }

    fn put(&mut self, idx: u32) -> Result<(), String> {
        let weight = self.stack.last().ok_or("memoize on an empty stack")?.weight;
        self.charge_copy(weight)?;
        let top = self.stack.last().ok_or("memoize on an empty stack")?;
        self.memo.insert(idx, top.clone());
        Ok(())
    }

    fn get(&mut self, idx: u32) -> Result<(), String> {
        let weight = self
            .memo
            .get(&idx)
            .ok_or_else(|| format!("memo index {idx} is unset"))?
            .weight;
        self.charge_copy(weight)?;
        let v = self
            .memo
            .get(&idx)
            .ok_or_else(|| format!("memo index {idx} is unset"))?;
        self.stack.push(v.clone());
        Ok(())
    }
}

/// The (key, value) pairs of a dict, in insertion order.
type DictItems = Vec<(Value, Value)>;

/// Mutable views of a stack slot's depth and weight, next to a borrow of its contents.
type SlotMeta<'a> = (&'a mut u32, &'a mut usize);

/// Records that values of (deepest) `depth` and (total) `weight` went into a container.
fn slot_absorb(meta: SlotMeta<'_>, depth: u32, weight: usize) -> Result<(), String> {
    let (d, w) = meta;
    *d = (*d).max(depth + 1);
    *w = (*w).saturating_add(weight);
    if *d > MAX_DEPTH {
        return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
    }
    Ok(())
}

/// The deepest depth and the total weight of some slots.
fn summarize(items: &[Slot]) -> (u32, usize) {
    items.iter().fold((0, 0usize), |(d, w), s| {
        (d.max(s.depth), w.saturating_add(s.weight))
    })
}

fn resolve_global(module: &str, name: &str) -> Result<Global, String> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "BFloat16Storage") => Global::Storage(StorageKind::BF16),
        ("torch", "HalfStorage") => Global::Storage(StorageKind::F16),
        ("torch", "FloatStorage") => Global::Storage(StorageKind::F32),
        _ => {
            return Err(format!(
                "global `{module}.{name}` is not allowed in a state dict"
            ))
        }
    })
}

/// `('storage', StorageType, key, location, numel)` becomes a storage reference.
fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Tuple(items) = pid else {
        return Err("persistent id is not a tuple".into());
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(kind)), Value::Str(key), _location, Value::Int(numel)]
            if tag == "storage" && *numel >= 0 =>
        {
            Ok(Value::Storage {
                kind: *kind,
                key: key.clone(),
                numel: *numel as u64,
            })
        }
        _ => Err("persistent id is not a ('storage', type, key, location, numel) tuple".into()),
    }
}

fn call(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match callable {
        Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Vec::new())),
        Value::Global(Global::RebuildTensorV2) => rebuild_tensor(args),
        Value::Global(Global::RebuildParameter) => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        other => Err(format!(
            "cannot call a {} with these arguments",
            other.kind()
        )),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, metadata])`.
fn rebuild_tensor(args: Vec<Value>) -> Result<Value, String> {
    let mut it = args.into_iter();
    let (Some(storage), Some(offset), Some(size), Some(stride)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err("_rebuild_tensor_v2 needs at least 4 arguments".into());
    };
    let Value::Storage { kind, key, numel } = storage else {
        return Err("_rebuild_tensor_v2: first argument is not a storage".into());
    };
    let Value::Int(offset) = offset else {
        return Err("_rebuild_tensor_v2: offset is not an int".into());
    };
    Ok(Value::Tensor(TensorRef {
        kind,
        key,
        storage_numel: numel,
        offset: u64::try_from(offset).map_err(|_| "negative storage offset")?,
        shape: int_tuple(size)?,
        stride: int_tuple(stride)?,
    }))
}

fn int_tuple(v: Value) -> Result<Vec<usize>, String> {
    let Value::Tuple(items) = v else {
        return Err("tensor size/stride is not a tuple".into());
    };
    items
        .into_iter()
        .map(|i| match i {
            Value::Int(n) if n >= 0 => Ok(n as usize),
            _ => Err("tensor size/stride holds a non-integer".to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of `{'w': _rebuild_tensor_v2(<storage 0, bf16, 6>, 0, (2, 3), (3, 1), False, OrderedDict())}`.
    fn tiny_pickle() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'w'];
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\nq\x01(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nBFloat16Storage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend_from_slice(
            b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)RtR",
        );
        p.extend_from_slice(b"u.");
        p
    }

    #[test]
    fn reads_a_minimal_state_dict() {
        let dict = read_state_dict(&tiny_pickle()).unwrap();
        assert_eq!(dict.len(), 1);
        let (name, t) = &dict[0];
        assert_eq!(name, "w");
        assert_eq!(t.kind, StorageKind::BF16);
        assert_eq!((t.key.as_str(), t.storage_numel, t.offset), ("0", 6, 0));
        assert_eq!(
            (t.shape.clone(), t.stride.clone()),
            (vec![2, 3], vec![3, 1])
        );
    }

    #[test]
    fn rejects_arbitrary_globals() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.";
        let err = read_state_dict(p).unwrap_err();
        assert!(err.contains("os.system"), "{err}");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let full = tiny_pickle();
        for cut in 0..full.len() {
            assert!(read_state_dict(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// Regression (pickle bomb): PUT/GET copied memoised values without limit, so each 7 bytes
    /// of `GET 0, GET 0, TUPLE2, PUT 0` doubled the value: 64 rounds asked for 2^64 nodes.
    #[test]
    fn memo_copies_cannot_double_a_value_without_limit() {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..64 {
            p.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let err = read_state_dict(&p).unwrap_err();
        assert!(err.contains("size limit"), "{err}");
    }

    /// Regression: nesting had no limit, so a long run of TUPLE1 built a value whose recursive
    /// drop overflowed the thread's stack (a crash, not an error).
    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, 1_000_000));
        p.push(b'.');
        let err = read_state_dict(&p).unwrap_err();
        assert!(err.contains("nest deeper"), "{err}");
        // Lists and dicts count too.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 100));
        p.extend(std::iter::repeat_n(b'a', 99));
        p.push(b'.');
        let err = read_state_dict(&p).unwrap_err();
        assert!(err.contains("nest deeper"), "{err}");
    }

    #[test]
    fn unknown_opcodes_are_refused() {
        let err = read_state_dict(b"\x80\x02i__builtin__\neval\n.").unwrap_err();
        assert!(err.contains("not allowed"), "{err}");
    }
}
