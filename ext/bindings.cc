// Python bindings: the thin layer between fastpersist_jax.io_engine and the
// C++ core. Buffers are resolved while holding the GIL; all I/O runs without it.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <system_error>
#include <vector>

#include "aligned_buffer.h"
#include "alignment.h"
#include "copy.h"
#include "engine.h"
#include "errors.h"
#include "file.h"

namespace py = pybind11;
using namespace fastpersist;

namespace {

// A Py_buffer held for the duration of one engine call. Released with the GIL.
class HeldBuffer {
 public:
  HeldBuffer(py::handle obj, bool writable) {
    const int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) throw py::error_already_set();
    held_ = true;
  }
  HeldBuffer(HeldBuffer&& o) noexcept : view_(o.view_), held_(o.held_) { o.held_ = false; }
  HeldBuffer(const HeldBuffer&) = delete;
  ~HeldBuffer() {
    if (held_) PyBuffer_Release(&view_);
  }
  char* data() const { return static_cast<char*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

struct Batch {
  std::vector<HeldBuffer> held;
  std::vector<Extent> extents;
};

// extents: sequence of (File, file_offset, buffer); the buffer's whole length
// is transferred.
Batch make_batch(const py::sequence& items, bool writable) {
  Batch b;
  b.held.reserve(py::len(items));
  b.extents.reserve(py::len(items));
  for (py::handle item : items) {
    if (!PySequence_Check(item.ptr()) || PySequence_Size(item.ptr()) != 3) {
      PyErr_Clear();
      throw py::value_error("each extent must be (File, offset, buffer)");
    }
    auto t = py::reinterpret_borrow<py::sequence>(item);
    File* f = t[0].cast<File*>();
    const long long off = t[1].cast<long long>();
    if (off < 0) throw py::value_error("negative file offset for " + f->path());
    b.held.emplace_back(t[2], writable);
    b.extents.push_back(Extent{f, static_cast<uint64_t>(off), b.held.back().data(), b.held.back().size()});
  }
  return b;
}

}  // namespace

PYBIND11_MODULE(_ext, m) {
  m.doc() = "fastpersist_jax I/O engine: io_uring reads/writes of aligned host buffers";
  m.attr("liburing_version") = FASTPERSIST_LIBURING_VERSION;
  m.attr("PAGE_SIZE") = kPageSize;

  static py::exception<RingUnavailable> ring_unavailable(m, "RingUnavailable", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    auto raise_oserror = [](int err, const std::string& what, const std::string* path) {
      py::object builtins = py::module_::import("builtins");
      py::object exc = path ? builtins.attr("OSError")(err, what, *path)
                            : builtins.attr("OSError")(err, what);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    };
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IoError& e) {
      raise_oserror(e.err(), e.what(), &e.path());
    } catch (const RingUnavailable& e) {
      py::set_error(ring_unavailable, e.what());
    } catch (const std::system_error& e) {
      raise_oserror(e.code().value(), e.what(), nullptr);
    }
  });

  // The O_DIRECT alignment planning (alignment.h), exposed for its unit tests.
  py::module_ align = m.def_submodule("alignment", "O_DIRECT alignment planning (for tests)");
  align.def("plan_write", [](uint64_t offset, uint64_t len, uintptr_t address, uint64_t offset_align,
                             uint64_t mem_align, uint64_t prior_end, bool direct) {
              const WritePlan p = plan_write(Alignment{direct, offset_align, mem_align}, offset, len,
                                             address, prior_end);
              py::dict d;
              d["main_len"] = p.main_len;
              d["bulk"] = p.bulk;
              d["copy"] = p.copy;
              d["pad_tail"] = p.pad_tail;
              d["buffered_from"] = p.buffered_from;
              d["buffered_len"] = p.buffered_len;
              d["bounce_bytes"] = p.bounce_bytes;
              return d;
            }, py::arg("offset"), py::arg("len"), py::arg("address"), py::arg("offset_align"),
            py::arg("mem_align"), py::arg("prior_end"), py::arg("direct") = true,
            "plan_write as a dict of WritePlan's fields.");
  align.def("plan_read", [](uint64_t offset, uint64_t len, uintptr_t address, uint64_t offset_align,
                            uint64_t mem_align, bool direct) {
              py::list out;
              for (const ReadWindow& w : plan_read(Alignment{direct, offset_align, mem_align},
                                                   offset, len, address)) {
                out.append(py::make_tuple(w.file_offset, w.len, w.bounce));
              }
              return out;
            }, py::arg("offset"), py::arg("len"), py::arg("address"), py::arg("offset_align"),
            py::arg("mem_align"), py::arg("direct") = true,
            "plan_read as [(file_offset, len, bounce), ...].");

  m.def("copy_many", [](const py::sequence& pairs, unsigned threads) {
          std::vector<HeldBuffer> held;
          std::vector<CopyTask> tasks;
          held.reserve(2 * py::len(pairs));
          tasks.reserve(py::len(pairs));
          for (py::handle item : pairs) {
            if (!PySequence_Check(item.ptr()) || PySequence_Size(item.ptr()) != 2) {
              PyErr_Clear();
              throw py::value_error("each copy must be (destination, source)");
            }
            auto t = py::reinterpret_borrow<py::sequence>(item);
            held.emplace_back(t[0], /*writable=*/true);
            held.emplace_back(t[1], /*writable=*/false);
            const HeldBuffer& dst = held[held.size() - 2];
            const HeldBuffer& src = held.back();
            if (dst.size() != src.size()) {
              throw py::value_error("copy_many: destination is " + std::to_string(dst.size()) +
                                    " bytes, source " + std::to_string(src.size()));
            }
            tasks.push_back({dst.data(), src.data(), src.size()});
          }
          py::gil_scoped_release release;
          parallel_copy(tasks, threads);
        }, py::arg("pairs"), py::arg("threads") = 1,
        "Copy [(dst, src), ...] (equal sizes) with `threads` threads, without the GIL.");

  py::class_<AlignedBuffer>(m, "AlignedBuffer", py::buffer_protocol(),
                            "Page-aligned, pre-faulted host memory (buffer protocol, uint8).")
      .def(py::init<size_t, bool>(), py::arg("nbytes"), py::arg("lock") = false,
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("nbytes", &AlignedBuffer::size)
      .def_property_readonly("address", [](const AlignedBuffer& b) {
        return reinterpret_cast<uintptr_t>(b.data());
      })
      .def_property_readonly("locked", &AlignedBuffer::locked)
      .def("__len__", &AlignedBuffer::size)
      .def_buffer([](AlignedBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1});
      });

  py::class_<File>(m, "File", "A file opened for the engine (O_DIRECT where possible).")
      .def(py::init([](const std::string& path, const std::string& mode, bool direct,
                       unsigned long long preallocate) {
             if (mode != "r" && mode != "w") throw py::value_error("mode must be 'r' or 'w'");
             py::gil_scoped_release release;
             return std::make_unique<File>(path, mode == "w" ? File::Mode::kWrite : File::Mode::kRead,
                                           direct, preallocate);
           }),
           py::arg("path"), py::arg("mode") = "r", py::arg("direct") = true,
           py::arg("preallocate") = 0)
      .def_property_readonly("path", &File::path)
      .def_property_readonly("mode", [](const File& f) { return f.mode() == File::Mode::kWrite ? "w" : "r"; })
      .def_property_readonly("direct", &File::direct)
      .def_property_readonly("direct_note", &File::direct_note)
      .def_property_readonly("offset_align", &File::offset_align)
      .def_property_readonly("mem_align", &File::mem_align)
      .def_property_readonly("closed", [](const File& f) { return !f.is_open(); })
      .def_property_readonly("logical_end", &File::logical_end)
      .def("size", &File::size)
      .def("close", &File::close)
      .def("__enter__", [](File& f) -> File& { return f; }, py::return_value_policy::reference)
      .def("__exit__", [](File& f, py::args) { f.close(); });

  const EngineConfig kDefaults;  // the binding's defaults are the C++ ones
  // dynamic_attr: the engine keeps its registered buffers alive (see
  // register_buffers below).
  py::class_<Engine>(m, "Engine", py::dynamic_attr(),
                     "Batched reads/writes on io_uring or a thread pool.")
      .def(py::init([](const std::string& kind, unsigned queue_depth, size_t chunk_bytes,
                       unsigned threads) {
             EngineConfig c;
             c.kind = parse_engine_kind(kind);  // std::invalid_argument: ValueError
             c.queue_depth = queue_depth;
             c.chunk_bytes = chunk_bytes;
             c.threads = threads;
             return std::make_unique<Engine>(c);
           }),
           py::arg("kind") = engine_kind_name(kDefaults.kind),
           py::arg("queue_depth") = kDefaults.queue_depth,
           py::arg("chunk_bytes") = kDefaults.chunk_bytes, py::arg("threads") = kDefaults.threads)
      .def_property_readonly("kind", [](const Engine& e) { return engine_kind_name(e.config().kind); })
      .def_property_readonly("queue_depth", [](const Engine& e) { return e.config().queue_depth; })
      .def_property_readonly("chunk_bytes", [](const Engine& e) { return e.config().chunk_bytes; })
      .def_property_readonly("threads", [](const Engine& e) { return e.config().threads; })
      .def_property_readonly("registered_count", &Engine::registered_count)
      .def("write", [](Engine& e, const py::sequence& extents) {
             Batch b = make_batch(extents, /*writable=*/false);
             py::gil_scoped_release release;
             e.write(b.extents);
           }, py::arg("extents"), "Write [(File, offset, buffer), ...]; blocks without the GIL.")
      .def("read", [](Engine& e, const py::sequence& extents) {
             Batch b = make_batch(extents, /*writable=*/true);
             py::gil_scoped_release release;
             e.read(b.extents);
           }, py::arg("extents"), "Fill [(File, offset, buffer), ...] from the files.")
      .def("sync", [](Engine& e, const std::vector<File*>& files) {
             py::gil_scoped_release release;
             e.sync(files);
           }, py::arg("files"), "Truncate to logical size and fdatasync every file.")
      // The kernel pins the pages of a registered buffer and keeps using
      // those pages for every fixed-buffer request whose address falls in the
      // registered range. Were the AlignedBuffer freed while registered, a new
      // mapping at the same address would be "registered" too, and I/O would
      // silently go to the old pages. So the engine holds a reference to each
      // registered buffer until it is unregistered or replaced.
      .def("register_buffers", [](py::object self, const py::sequence& buffers) {
             Engine& e = self.cast<Engine&>();
             py::tuple keep(py::len(buffers));
             std::vector<std::pair<char*, size_t>> spans;
             for (size_t i = 0; i < keep.size(); ++i) {
               py::object obj = buffers[i];
               auto* b = obj.cast<AlignedBuffer*>();
               spans.emplace_back(b->data(), b->mapped_size());
               keep[i] = obj;
             }
             std::string why;
             bool ok;
             {
               py::gil_scoped_release release;
               ok = e.register_buffers(spans, &why);
             }
             // A failed registration has dropped the previous one as well.
             self.attr("_registered_buffers") = ok ? keep : py::tuple();
             return py::make_tuple(ok, why);
           }, py::arg("buffers"))
      .def("unregister_buffers", [](py::object self) {
             Engine& e = self.cast<Engine&>();
             {
               py::gil_scoped_release release;
               e.unregister_buffers();
             }
             self.attr("_registered_buffers") = py::tuple();
           });
}
