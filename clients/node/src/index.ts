export { MicroVMRuntimeContext, ContainerRuntimeContext, WindowsAppContainerContext } from './contexts.js';
export type { Availability, NetworkPolicy, RuntimeOptions, WindowsOptions } from './contexts.js';
export { guestEnv } from './contexts.js';
export { ShimConnection } from './connection.js';
export type { ProgressEvent, ProcessNotification } from './connection.js';
export { ShimError, ShimNotFound } from './errors.js';
export { locateShim, platformPackage } from './locate.js';
export { ShimProcess } from './process.js';
export type * from './types.js';
