// Runs one job with the real OpenFn runtime (@openfn/runtime), loading its
// adaptor from a repo the way OpenFn's worker does (linker.repo + the
// adaptor's version). argv: <repo> <name@version>. Prints the final state.
// Needs `node --experimental-vm-modules` (the runtime's module loader).
import run from '@openfn/runtime'

const [repo, spec] = process.argv.slice(2)
const at = spec.lastIndexOf('@')
const [name, version] = [spec.slice(0, at), spec.slice(at + 1)]
const job = `import { adaptor, fn } from ${JSON.stringify(name)}
export default [adaptor(), fn((state) => ({ ...state, data: { ...state.data, ran: true } }))]`
const state = await run(job, { data: {} }, { linker: { repo, modules: { [name]: { version } } } })
process.stdout.write(JSON.stringify(state) + '\n')
