package ferry

import java.util.{Map => JMap}

import scala.util.control.NonFatal

import org.apache.spark.SparkConf
import org.apache.spark.api.plugin.{DriverPlugin, ExecutorPlugin, PluginContext, SparkPlugin}
import org.slf4j.LoggerFactory

/**
 * Starts each executor's ferry workers with the executor, as a sidecar, instead of when its
 * first ferry task asks for one.
 *
 * {{{
 *   spark-submit --conf spark.plugins=ferry.FerryPlugin --jars ferry-assembly.jar ...
 * }}}
 *
 * Without it a pool starts a worker when a task first borrows one (and, in local mode, a
 * transformer starts them as its planning query begins): a Python interpreter importing numpy,
 * pyarrow and grpc, about 0.6 s on an idle core and 2-3 s when it competes with a cold JVM for
 * two cores. With it the workers come up while the executor registers, before any job.
 * `spark.ferry.worker.prestart` says how many (default: the executor's task slots,
 * `spark.executor.cores / spark.task.cpus`, or the local master's cores); 0 starts none.
 * Workers started this way are ordinary pool workers: idle ones stop after
 * `spark.ferry.worker.idleTimeout` like any other. With `spark.ferry.worker.address` set (a
 * remote worker) the plugin does nothing. A worker that fails to start is logged and left to
 * the first task, which then reports the failure as it would without the plugin.
 */
class FerryPlugin extends SparkPlugin {
  override def driverPlugin(): DriverPlugin = null

  override def executorPlugin(): ExecutorPlugin = new ExecutorPlugin {
    override def init(ctx: PluginContext, extraConf: JMap[String, String]): Unit =
      try {
        val conf = FerryConf.fromSparkConf(ctx.conf())
        val count = FerryPlugin.prestartCount(ctx.conf())
        if (!conf.isRemote && count > 0) {
          FerryPlugin.log.info(s"starting $count ferry worker(s) for executor ${ctx.executorID()}")
          WorkerPool.get(conf).prestart(count)
        }
      } catch {
        // A bad setting must not keep the executor from starting: the first task reports it.
        case NonFatal(e) => FerryPlugin.log.warn(s"ferry workers not prestarted: ${e.getMessage}")
      }
  }
}

object FerryPlugin {
  private val log = LoggerFactory.getLogger(classOf[FerryPlugin])

  val Prestart = "spark.ferry.worker.prestart"

  private val LocalN = """local\[(\d+|\*)(?:,\s*\d+)?\]""".r

  /** How many workers an executor starts: `spark.ferry.worker.prestart`, else its task slots. */
  def prestartCount(conf: SparkConf): Int = conf.getOption(Prestart).map(_.trim) match {
    case Some(v) =>
      val n = try v.toInt catch {
        case _: NumberFormatException =>
          throw new IllegalArgumentException(s"$Prestart must be a count of workers (0 = none), got '$v'")
      }
      require(n >= 0, s"$Prestart must be >= 0 (0 = none), got $n")
      n
    case None => taskSlots(conf)
  }

  /** Tasks an executor runs at once: its cores over spark.task.cpus (local mode: the master's cores). */
  def taskSlots(conf: SparkConf): Int = {
    val cores = conf.get("spark.master", "") match {
      case "local" => 1
      case LocalN("*") => Runtime.getRuntime.availableProcessors()
      case LocalN(n) => n.toInt
      case _ => conf.getInt("spark.executor.cores", 1)
    }
    math.max(1, cores / math.max(1, conf.getInt("spark.task.cpus", 1)))
  }
}
