//! Every map of the object. Sizes here are defaults: the agent sets the real capacity with
//! `EbpfLoader::set_max_entries` before loading.

use aya_ebpf::{
    btf_maps::Array as BtfArray,
    macros::{btf_map, map},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use cache_common::{
    Bucket, Config, Counters, FILL_TICKET_SLOTS, FlowKey, Histogram, KeyMeta, State, TEXT0, TEXT1,
    TEXT2, TEXT3,
};

use crate::scanner::FlowState;
use crate::scratch::Scratch;
use crate::tickets::TicketSlot;

/// Tail-call targets of `xdp_cache`, filled by the agent.
#[map]
pub static JUMP: ProgramArray = ProgramArray::with_max_entries(2, 0);
pub const JUMP_GET: u32 = 0;
pub const JUMP_SCAN: u32 = 1;

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
pub static STATE: Array<State> = Array::with_max_entries(1, 0);
#[map]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static HIT_LATENCY: PerCpuArray<Histogram> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static MISS_LATENCY: PerCpuArray<Histogram> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static KEY_META: Array<KeyMeta> = Array::with_max_entries(1 << 16, 0);
#[map]
pub static FILL_TICKETS: Array<TicketSlot> = Array::with_max_entries(FILL_TICKET_SLOTS, 0);
#[map]
pub static TCP_FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(1 << 16, 0);
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// Keys filled without a known TTL, for the agent to ask memcached (see learn.rs). 256 KiB
/// holds 3,200 short-key queries (80 bytes with the record header), 30 ms of fills at 100k/s:
/// the agent drains it every 10 ms, and a ring this small stays in cache.
#[map]
pub static TTL_QUERIES: RingBuf = RingBuf::with_byte_size(1 << 18, 0);
/// BPF_F_NO_PREALLOC is mandatory for LPM tries.
#[map]
pub static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
pub static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, 0);

// The cache itself: one bucket array per size class. BTF maps, because only those may hold a
// bpf_spin_lock.
#[btf_map]
pub static CLASS0: BtfArray<Bucket<TEXT0>, 1024> = BtfArray::new();
#[btf_map]
pub static CLASS1: BtfArray<Bucket<TEXT1>, 256> = BtfArray::new();
#[btf_map]
pub static CLASS2: BtfArray<Bucket<TEXT2>, 128> = BtfArray::new();
#[btf_map]
pub static CLASS3: BtfArray<Bucket<TEXT3>, 64> = BtfArray::new();
