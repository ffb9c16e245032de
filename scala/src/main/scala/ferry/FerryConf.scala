package ferry

import java.util.Locale

import org.apache.spark.SparkConf
import org.apache.spark.network.util.JavaUtils
import org.apache.spark.sql.SparkSession

/**
 * Every tunable of ferry's JVM side, read from Spark confs named `spark.ferry.*`.
 *
 * Set them like any Spark conf: `--conf spark.ferry.python=/opt/venv/bin/python` on
 * spark-submit, `SparkSession.builder().config(...)`, or `spark.conf.set(...)` before a
 * transform. The driver resolves them once per transform and ships the result to the tasks, so
 * a runtime `spark.conf.set` reaches the executors too.
 *
 * | key | default | meaning |
 * |---|---|---|
 * | `spark.ferry.python` | `python3` | Python interpreter that runs `-m ferry worker` (e.g. a venv shipped with `--archives`) |
 * | `spark.ferry.worker.address` | unset | `host:port` of a remote worker or pool; when set no local process is started |
 * | `spark.ferry.worker.token` | unset | bearer token of the remote worker |
 * | `spark.ferry.worker.tokenFile` | unset | file holding the bearer token of the remote worker |
 * | `spark.ferry.worker.stages` | empty | comma-separated Python modules that register extra stages (`--stages`) |
 * | `spark.ferry.worker.pythonPath` | empty | entries prepended to the worker's `PYTHONPATH` (path-separator separated) |
 * | `spark.ferry.worker.logDir` | a temp dir | directory for the workers' stderr logs |
 * | `spark.ferry.worker.startTimeout` | `60s` | how long a new worker may take to report its port |
 * | `spark.ferry.worker.prestart` | task slots | workers [[FerryPlugin]] (`spark.plugins=ferry.FerryPlugin`) starts with each executor; `0` = none |
 * | `spark.ferry.worker.idleTimeout` | `10min` | a local worker idle for this long is stopped; `0` = never |
 * | `spark.ferry.batch.maxRows` | `65536` | rows per Arrow batch sent to a worker |
 * | `spark.ferry.batch.maxBytes` | `4m` | bytes per Arrow batch message (a single larger row travels alone) |
 * | `spark.ferry.grpc.maxMessageBytes` | `512m` | gRPC message limit, both directions, also given to the workers ferry starts (`--max-message-bytes`); one row travels in one message |
 * | `spark.ferry.sharedMemory.bytes` | `64m` | per direction: a worker this JVM started exchanges Run batches with it through two files of this size in /dev/shm instead of the socket (a batch that does not fit goes over the socket); `0` = off |
 * | `spark.ferry.run.maxInFlight` | `4` | batches sent to a worker and not yet answered, per stream (back-pressure) |
 * | `spark.ferry.rpc.timeout` | `120s` | deadline of unary calls (ListStages, Describe, health checks) |
 * | `spark.ferry.run.responseTimeout` | `30min` | a Run whose worker answers nothing for this long while batches are outstanding fails and the worker is replaced; `0` = wait forever |
 * | `spark.ferry.arrow.maxAllocation` | `2g` | Arrow off-heap memory ferry may hold per JVM |
 * | `spark.ferry.convolve.maxRunsPerPartition` | `1024` | Convolve re-lays out the data by id when a partition holds more runs of consecutive ids |
 */
final case class FerryConf(
    python: String,
    workerAddress: Option[String],
    workerToken: Option[String],
    workerTokenFile: Option[String],
    workerStages: Seq[String],
    workerPythonPath: Seq[String],
    workerLogDir: Option[String],
    workerStartTimeoutMs: Long,
    workerIdleTimeoutMs: Long,
    batchMaxRows: Int,
    batchMaxBytes: Long,
    grpcMaxMessageBytes: Int,
    maxInFlight: Int,
    rpcTimeoutMs: Long,
    runResponseTimeoutMs: Long,
    arrowMaxAllocation: Long,
    convolveMaxRunsPerPartition: Int,
    sharedMemoryBytes: Long = 64L << 20) {

  require(batchMaxRows >= 1, s"${FerryConf.BatchMaxRows} must be >= 1, got $batchMaxRows")
  require(batchMaxBytes >= 1, s"${FerryConf.BatchMaxBytes} must be >= 1, got $batchMaxBytes")
  require(maxInFlight >= 1, s"${FerryConf.MaxInFlight} must be >= 1, got $maxInFlight")
  require(grpcMaxMessageBytes >= 1024,
    s"${FerryConf.GrpcMaxMessageBytes} must be at least 1k, got $grpcMaxMessageBytes")
  require(runResponseTimeoutMs >= 0,
    s"${FerryConf.RunResponseTimeout} must be >= 0 (0 = wait forever), got $runResponseTimeoutMs ms")
  require(workerIdleTimeoutMs >= 0, s"${FerryConf.WorkerIdleTimeout} must be >= 0 (0 = never), got $workerIdleTimeoutMs ms")
  require(sharedMemoryBytes >= 0 && sharedMemoryBytes <= (1L << 30),
    s"${FerryConf.SharedMemoryBytes} must be between 0 (off) and 1g, got $sharedMemoryBytes")
  require(convolveMaxRunsPerPartition >= 1,
    s"${FerryConf.ConvolveMaxRuns} must be >= 1, got $convolveMaxRunsPerPartition")

  /** The settings that decide which worker processes a pool launches or connects to. */
  private[ferry] def poolKey: FerryConf.PoolKey =
    FerryConf.PoolKey(python, workerAddress, workerToken, workerTokenFile, workerStages, workerPythonPath,
      workerLogDir, grpcMaxMessageBytes, workerIdleTimeoutMs, runResponseTimeoutMs, sharedMemoryBytes)

  /** Whether a remote worker is used instead of local processes. */
  def isRemote: Boolean = workerAddress.isDefined
}

object FerryConf {
  val Python = "spark.ferry.python"
  val WorkerAddress = "spark.ferry.worker.address"
  val WorkerToken = "spark.ferry.worker.token"
  val WorkerTokenFile = "spark.ferry.worker.tokenFile"
  val WorkerStages = "spark.ferry.worker.stages"
  val WorkerPythonPath = "spark.ferry.worker.pythonPath"
  val WorkerLogDir = "spark.ferry.worker.logDir"
  val WorkerStartTimeout = "spark.ferry.worker.startTimeout"
  val WorkerIdleTimeout = "spark.ferry.worker.idleTimeout"
  val BatchMaxRows = "spark.ferry.batch.maxRows"
  val BatchMaxBytes = "spark.ferry.batch.maxBytes"
  val GrpcMaxMessageBytes = "spark.ferry.grpc.maxMessageBytes"
  val MaxInFlight = "spark.ferry.run.maxInFlight"
  val RpcTimeout = "spark.ferry.rpc.timeout"
  val RunResponseTimeout = "spark.ferry.run.responseTimeout"
  val ArrowMaxAllocation = "spark.ferry.arrow.maxAllocation"
  val ConvolveMaxRuns = "spark.ferry.convolve.maxRunsPerPartition"
  val SharedMemoryBytes = "spark.ferry.sharedMemory.bytes"

  private[ferry] final case class PoolKey(
      python: String,
      address: Option[String],
      token: Option[String],
      tokenFile: Option[String],
      stages: Seq[String],
      pythonPath: Seq[String],
      logDir: Option[String],
      maxMessageBytes: Int,
      idleTimeoutMs: Long,
      responseTimeoutMs: Long,
      sharedMemoryBytes: Long)

  /** Defaults only (no Spark needed): handy for a `WorkerClient` or `WorkerPool` used directly. */
  def defaults: FerryConf = fromMap(Map.empty)

  /** The session's current `spark.ferry.*` settings (runtime conf included). */
  def get(spark: SparkSession): FerryConf = fromMap(spark.conf.getAll)

  def fromSparkConf(conf: SparkConf): FerryConf = fromMap(conf.getAll.toMap)

  def fromMap(settings: collection.Map[String, String]): FerryConf = {
    def opt(key: String): Option[String] = settings.get(key).map(_.trim).filter(_.nonEmpty)
    def list(key: String, sep: String): Seq[String] =
      opt(key).map(_.split(sep).toSeq.map(_.trim).filter(_.nonEmpty)).getOrElse(Nil)
    def bytes(key: String, default: String): Long = {
      val v = opt(key).getOrElse(default)
      try JavaUtils.byteStringAsBytes(v.toLowerCase(Locale.ROOT))
      catch {
        case e: NumberFormatException =>
          throw new IllegalArgumentException(s"$key must be a size such as 4m or 4194304, got '$v'", e)
      }
    }
    def millis(key: String, default: String): Long = {
      val v = opt(key).getOrElse(default)
      try JavaUtils.timeStringAsMs(v)
      catch {
        case e: NumberFormatException =>
          throw new IllegalArgumentException(s"$key must be a duration such as 60s or 2min, got '$v'", e)
      }
    }
    def int(key: String, default: Int): Int = opt(key).map { v =>
      try v.toInt
      catch {
        case e: NumberFormatException =>
          throw new IllegalArgumentException(s"$key must be an integer, got '$v'", e)
      }
    }.getOrElse(default)

    val maxMessage = bytes(GrpcMaxMessageBytes, "512m")
    require(maxMessage <= Int.MaxValue, s"$GrpcMaxMessageBytes must be below 2g, got $maxMessage")
    FerryConf(
      python = opt(Python).getOrElse("python3"),
      workerAddress = opt(WorkerAddress),
      workerToken = opt(WorkerToken),
      workerTokenFile = opt(WorkerTokenFile),
      workerStages = list(WorkerStages, ","),
      workerPythonPath = list(WorkerPythonPath, java.io.File.pathSeparator),
      workerLogDir = opt(WorkerLogDir),
      workerStartTimeoutMs = millis(WorkerStartTimeout, "60s"),
      workerIdleTimeoutMs = millis(WorkerIdleTimeout, "10min"),
      batchMaxRows = int(BatchMaxRows, 65536),
      batchMaxBytes = bytes(BatchMaxBytes, "4m"),
      grpcMaxMessageBytes = maxMessage.toInt,
      maxInFlight = int(MaxInFlight, 4),
      rpcTimeoutMs = millis(RpcTimeout, "120s"),
      runResponseTimeoutMs = millis(RunResponseTimeout, "30min"),
      arrowMaxAllocation = bytes(ArrowMaxAllocation, "2g"),
      convolveMaxRunsPerPartition = int(ConvolveMaxRuns, 1024),
      sharedMemoryBytes = bytes(SharedMemoryBytes, "64m"))
  }
}
