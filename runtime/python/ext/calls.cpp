// slimengine._calls: the Python binding's calls that must cost microseconds, compiled (docs/python-binding.md).
// Through ctypes a call costs ~20 us of argument marshalling, which is all of a one-id bank lookup. This module calls
// the same C ABI (runtime/include/slimengine.h): it links nothing, and calls the functions of the library the binding
// loaded (their addresses come from ctypes at bind()), so one library serves both paths.
//
// Bank: a memory bank handle's lifetime guard (calls in flight; close() waits for them, as the binding's other gates)
// and its lookup, done whole here: arguments checked, results allocated, the GIL released around the C call.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <pthread.h>
#include <sched.h>

#include <cstdint>

#include "slimengine.h"

namespace {

// The C library's functions, from the binding's ctypes library (bind()), and the binding's error type and id coercion.
struct Api {
    decltype(&slim_bank_lookup) bank_lookup = nullptr;
    decltype(&slim_bank_close) bank_close = nullptr;
    decltype(&slim_last_error) last_error = nullptr;
    decltype(&slim_status_name) status_name = nullptr;
    PyObject* error_type = nullptr;  // slimengine.SlimError(status_name, message)
    PyObject* as_int64 = nullptr;    // slimengine's id coercion (name: str) -> C-contiguous int64 ndarray
} api;

// Forks of this process so far, counted in the child (pthread_atfork): a handle compares it with its own, which costs
// nothing on every call, where getpid() would be a system call.
uint64_t fork_generation = 0;

constexpr int64_t kMaxBankIds = int64_t{1} << 24;  // slim_bank_lookup's limit: checked before the results are allocated

PyObject* raise_slim(const char* status_name, PyObject* message) {
    if (!message) return nullptr;
    PyObject* error = PyObject_CallFunction(api.error_type, "sO", status_name, message);
    Py_DECREF(message);
    if (error) {
        PyErr_SetObject(api.error_type, error);
        Py_DECREF(error);
    }
    return nullptr;
}

// The status of a C call as the binding's SlimError; the message is the calling thread's slim_last_error.
PyObject* raise_status(slim_status status) {
    const char* message = api.last_error();
    // "replace": a message may quote bytes of a damaged file.
    return raise_slim(api.status_name(status), PyUnicode_DecodeUTF8(message, static_cast<Py_ssize_t>(strlen(message)), "replace"));
}

// ---- Bank ----

struct Bank {
    PyObject_HEAD slim_bank* handle;
    int64_t dim;
    int64_t calls;        // calls in flight (counted under the GIL)
    bool closed;          // close() began: no call may start
    bool forked_busy;     // this process was forked while another thread's call ran: the handle is that call's, mid-way
    uint64_t generation;  // fork_generation when the calls were counted
};

// After os.fork() the child has only the forking thread: calls counted before belong to threads it does not have.
void notice_fork(Bank* b) {
    if (b->generation == fork_generation) return;
    b->forked_busy = b->forked_busy || b->calls > 0;
    b->calls = 0;
    b->generation = fork_generation;
}

// Starts a call: false with SlimError set when the bank is closed or unusable after a fork.
bool enter(Bank* b) {
    notice_fork(b);
    if (b->closed) {
        raise_slim("SLIM_ERR_INVALID_ARGUMENT", PyUnicode_FromString("the memory bank is closed"));
        return false;
    }
    if (b->forked_busy) {
        raise_slim("SLIM_ERR_INVALID_ARGUMENT",
                   PyUnicode_FromString("the memory bank was in use by another thread when this process was forked: its state belongs to "
                                        "that call, which this process does not have; open it again in this process (closing this one "
                                        "here frees nothing)"));
        return false;
    }
    ++b->calls;
    return true;
}

void leave(Bank* b) {
    if (b->generation == fork_generation && b->calls > 0) --b->calls;
}

int bank_init(Bank* self, PyObject* args, PyObject*) {
    unsigned long long address = 0;
    long long dim = 0;
    if (!PyArg_ParseTuple(args, "KL", &address, &dim)) return -1;
    if (!api.bank_lookup) {  // the module alone, before the binding bound it: its calls would jump to nothing
        PyErr_SetString(PyExc_RuntimeError, "slimengine._calls is not bound to a library: open banks with slimengine.MemoryBank");
        return -1;
    }
    self->handle = reinterpret_cast<slim_bank*>(static_cast<uintptr_t>(address));
    self->dim = dim;
    self->calls = 0;
    self->closed = self->forked_busy = false;
    self->generation = fork_generation;
    return 0;
}

// A tensor of `array` (an int64, float32 or bool ndarray), shape and strides as numpy has them.
slim_tensor tensor_of(PyArrayObject* array, int32_t dtype, int64_t* shape) {
    const int ndim = PyArray_NDIM(array);
    for (int i = 0; i < ndim; ++i) shape[i] = PyArray_DIM(array, i);
    slim_tensor t{};
    t.data = PyArray_DATA(array);
    t.dtype = dtype;
    t.device_type = SLIM_DEVICE_CPU;
    t.ndim = ndim;
    t.shape = shape;
    return t;  // strides NULL: contiguous
}

// lookup(ids) -> (embeddings [N, dim] float32, found [N] bool, write_times_us [N] int64, model_versions [N] int64).
PyObject* bank_lookup(Bank* self, PyObject* ids_arg) {
    PyArrayObject* ids = nullptr;
    if (PyArray_CheckExact(ids_arg) && PyArray_TYPE(reinterpret_cast<PyArrayObject*>(ids_arg)) == NPY_INT64 &&
        PyArray_IS_C_CONTIGUOUS(reinterpret_cast<PyArrayObject*>(ids_arg))) {
        Py_INCREF(ids_arg);
        ids = reinterpret_cast<PyArrayObject*>(ids_arg);
    } else {  // anything else as the binding coerces ids (lists, other integer types, DLPack tensors; errors named)
        PyObject* coerced = PyObject_CallFunction(api.as_int64, "Os", ids_arg, "ids");
        if (!coerced) return nullptr;
        if (!PyArray_Check(coerced)) {
            Py_DECREF(coerced);
            PyErr_SetString(PyExc_TypeError, "ids: the id coercion returned no ndarray");
            return nullptr;
        }
        ids = reinterpret_cast<PyArrayObject*>(coerced);
    }
    // The C call checks the shape (1-D); the count is checked here first, before its results are allocated.
    const npy_intp n = PyArray_NDIM(ids) >= 1 ? PyArray_DIM(ids, 0) : 0;
    if (n > kMaxBankIds) {
        Py_DECREF(ids);
        return PyErr_Format(PyExc_ValueError, "ids: at most %lld per call, got %lld", static_cast<long long>(kMaxBankIds),
                            static_cast<long long>(n));
    }
    npy_intp rows_shape[2] = {n, static_cast<npy_intp>(self->dim)};
    PyObject* embeddings = PyArray_SimpleNew(2, rows_shape, NPY_FLOAT32);
    PyObject* found = PyArray_SimpleNew(1, &n, NPY_BOOL);
    PyObject* times = PyArray_SimpleNew(1, &n, NPY_INT64);
    PyObject* versions = PyArray_SimpleNew(1, &n, NPY_INT64);
    PyObject* result = nullptr;
    if (embeddings && found && times && versions && enter(self)) {
        int64_t shapes[4][NPY_MAXDIMS];
        const slim_tensor t_ids = tensor_of(ids, SLIM_DTYPE_INT64, shapes[0]);
        const slim_tensor t_emb = tensor_of(reinterpret_cast<PyArrayObject*>(embeddings), SLIM_DTYPE_FLOAT32, shapes[1]);
        const slim_tensor t_times = tensor_of(reinterpret_cast<PyArrayObject*>(times), SLIM_DTYPE_INT64, shapes[2]);
        const slim_tensor t_versions = tensor_of(reinterpret_cast<PyArrayObject*>(versions), SLIM_DTYPE_INT64, shapes[3]);
        slim_status status;
        Py_BEGIN_ALLOW_THREADS status = api.bank_lookup(self->handle, &t_ids, &t_emb, &t_times, &t_versions, nullptr);
        Py_END_ALLOW_THREADS leave(self);
        if (status != SLIM_OK) {
            raise_status(status);
        } else {
            const int64_t* written = static_cast<const int64_t*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(times)));
            npy_bool* present = static_cast<npy_bool*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(found)));
            for (npy_intp i = 0; i < n; ++i) present[i] = written[i] >= 0;  // a missing id's write time is -1
            result = PyTuple_Pack(4, embeddings, found, times, versions);
        }
    }
    Py_DECREF(ids);
    Py_XDECREF(embeddings);
    Py_XDECREF(found);
    Py_XDECREF(times);
    Py_XDECREF(versions);
    return result;
}

// `with bank:` around the binding's other (ctypes) calls: the handle's address, counted as a call in flight.
PyObject* bank_enter(Bank* self, PyObject*) {
    if (!enter(self)) return nullptr;
    return PyLong_FromVoidPtr(self->handle);
}

PyObject* bank_exit(Bank* self, PyObject*) {
    leave(self);
    Py_RETURN_NONE;
}

// close() -> True when this call freed the handle: no call may start, and the calls in flight are waited for (with
// the GIL released, so they can finish). False when it was closed before, or cannot be freed here after a fork.
PyObject* bank_close(Bank* self, PyObject*) {
    notice_fork(self);
    if (self->closed) Py_RETURN_FALSE;
    self->closed = true;
    if (self->forked_busy) Py_RETURN_FALSE;
    while (self->calls > 0) {
        Py_BEGIN_ALLOW_THREADS sched_yield();
        Py_END_ALLOW_THREADS
    }
    slim_bank* handle = self->handle;
    self->handle = nullptr;
    Py_BEGIN_ALLOW_THREADS api.bank_close(handle);
    Py_END_ALLOW_THREADS Py_RETURN_TRUE;
}

PyObject* bank_closed(Bank* self, void*) { return PyBool_FromLong(self->closed); }
PyObject* bank_calls(Bank* self, void*) {
    notice_fork(self);
    return PyLong_FromLongLong(self->calls);
}
PyObject* bank_forked_busy(Bank* self, void*) {
    notice_fork(self);
    return PyBool_FromLong(self->forked_busy);
}

PyMethodDef bank_methods[] = {
    {"lookup", reinterpret_cast<PyCFunction>(bank_lookup), METH_O,
     "lookup(ids) -> (embeddings, found, write_times_us, model_versions): slim_bank_lookup, results allocated here"},
    {"__enter__", reinterpret_cast<PyCFunction>(bank_enter), METH_NOARGS, "start a call: the handle's address"},
    {"__exit__", reinterpret_cast<PyCFunction>(bank_exit), METH_VARARGS, "end the call"},
    {"close", reinterpret_cast<PyCFunction>(bank_close), METH_NOARGS, "refuse new calls, wait for these, slim_bank_close"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef bank_getset[] = {
    {"closed", reinterpret_cast<getter>(bank_closed), nullptr, "close() began", nullptr},
    {"calls", reinterpret_cast<getter>(bank_calls), nullptr, "calls in flight in this process", nullptr},
    {"forked_busy", reinterpret_cast<getter>(bank_forked_busy), nullptr, "forked while another thread's call ran", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject BankType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// bind(functions: dict[str, int], error_type, as_int64): the library's function addresses, from ctypes.
PyObject* bind(PyObject*, PyObject* args) {
    PyObject *functions, *error_type, *as_int64;
    if (!PyArg_ParseTuple(args, "O!OO", &PyDict_Type, &functions, &error_type, &as_int64)) return nullptr;
    auto address = [&](const char* name) -> void* {
        PyObject* value = PyDict_GetItemString(functions, name);
        void* p = value ? PyLong_AsVoidPtr(value) : nullptr;
        if (!p && !PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "bind: no address for %s", name);
        return p;
    };
    Api bound;
    bound.bank_lookup = reinterpret_cast<decltype(bound.bank_lookup)>(address("slim_bank_lookup"));
    bound.bank_close = reinterpret_cast<decltype(bound.bank_close)>(address("slim_bank_close"));
    bound.last_error = reinterpret_cast<decltype(bound.last_error)>(address("slim_last_error"));
    bound.status_name = reinterpret_cast<decltype(bound.status_name)>(address("slim_status_name"));
    if (PyErr_Occurred()) return nullptr;
    Py_INCREF(error_type);
    Py_INCREF(as_int64);
    Py_XDECREF(api.error_type);
    Py_XDECREF(api.as_int64);
    bound.error_type = error_type;
    bound.as_int64 = as_int64;
    api = bound;
    Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {{"bind", bind, METH_VARARGS, "bind(functions, error_type, as_int64): the C library's functions"},
                                {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_calls", "The binding's hot calls, compiled over the C ABI.", -1, module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__calls(void) {
    import_array();
    if (pthread_atfork(nullptr, nullptr, [] { ++fork_generation; }) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return nullptr;
    }
    BankType.tp_name = "slimengine._calls.Bank";
    BankType.tp_basicsize = sizeof(Bank);
    BankType.tp_flags = Py_TPFLAGS_DEFAULT;
    BankType.tp_doc = "Bank(address, dim): a slim_bank handle's lifetime guard and lookup";
    BankType.tp_new = PyType_GenericNew;
    BankType.tp_init = reinterpret_cast<initproc>(bank_init);
    BankType.tp_methods = bank_methods;
    BankType.tp_getset = bank_getset;
    if (PyType_Ready(&BankType) < 0) return nullptr;
    PyObject* m = PyModule_Create(&module);
    if (!m) return nullptr;
    Py_INCREF(&BankType);
    if (PyModule_AddObject(m, "Bank", reinterpret_cast<PyObject*>(&BankType)) < 0) {
        Py_DECREF(&BankType);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
